"""PPLM (control/pplm.py): exact invariants on the tiny model (step size 0 = the engine's greedy tokens,
fusion, the attribute loss going down over the gradient iterations, no hooks or grads left behind),
bad input, the CLI and the app's callbacks; one short real-model check."""

from __future__ import annotations

import pytest
import torch

from steering_lab.control import pplm
from steering_lab.errors import UserError
from steering_lab.generate import generate_ids
from steering_lab.intervene import hook_count
from steering_lab.probes import Probe

PROMPTS = ["Tell me about your weekend.", "Describe a typical day at a library.", "How did the exam go?"]


def random_probe(d: int, layer: int = 2, pooling: str = "mean", seed: int = 0) -> Probe:
    g = torch.Generator().manual_seed(seed)
    return Probe(layer=layer, pooling=pooling, weight=torch.randn(d, generator=g), mean=torch.zeros(d),
                 scale=torch.ones(d), bias=torch.zeros(1), labels=("up", "down"))


@pytest.fixture(scope="module")
def bow(tiny):
    return pplm.bag_of_words(tiny, "positive")


def test_word_lists_are_ours_and_clean():
    names = pplm.bow_lists()
    assert {"positive", "negative"} <= set(names)
    for name in names:
        words = pplm.read_words(name)
        assert len(words) >= 20 and len(words) == len(set(words)), name
        assert all(w and not w.startswith("#") and w == w.strip() for w in words), name
    assert pplm.parse_words("# c\n a \n\nb\na\n") == ["a", "b"]


def test_bag_of_words_keeps_single_token_words(tiny):
    words = pplm.read_words("positive")
    b = pplm.bag_of_words(tiny, "positive")
    assert len(b.words) + len(b.skipped) == len(words) and b.words
    for w, t in zip(b.words, b.token_ids.tolist()):
        assert tiny.tokenizer.encode(" " + w, add_special_tokens=False) == [t]
    for w in b.skipped:
        assert len(tiny.tokenizer.encode(" " + w, add_special_tokens=False)) > 1


def test_step_size_zero_is_the_engines_greedy_answer(tiny, bow):
    probe = pplm.probe_attribute(tiny, random_probe(tiny.d_model), 1)
    for p in PROMPTS:
        want = generate_ids(tiny, [p], max_new_tokens=12)[0]
        for cfg in (pplm.PPLMConfig(stepsize=0.0, max_new_tokens=12),
                    pplm.PPLMConfig(stepsize=0.05, iterations=0, max_new_tokens=12, gm_scale=0.5)):
            res = pplm.generate(tiny, p, [bow, probe], cfg)
            assert res.token_ids == want, (p, cfg)
            assert res.losses == [[] for _ in want]  # nothing was perturbed


def _plain_logp(lm, prompt: str, generated: list[int]) -> list[torch.Tensor]:
    """Teacher-forced next-token log-distributions of the unsteered model, one per generated token."""
    ids = lm.encode_prompt(prompt) + generated
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0].float()
    n = len(lm.encode_prompt(prompt))
    return [torch.log_softmax(logits[n - 1 + t], -1) for t in range(len(generated))]


@pytest.mark.parametrize("gm", [1.0, 0.5])
def test_step_size_zero_fusion_is_the_plain_distribution(tiny, bow, gm):
    res = pplm.generate(tiny, PROMPTS[0], bow, pplm.PPLMConfig(stepsize=0.0, gm_scale=gm, max_new_tokens=6),
                        keep_dists=True)
    plain = _plain_logp(tiny, PROMPTS[0], res.token_ids)
    for got, want in zip(res.dists, plain):  # a separate (full-sequence) forward pass: float32 rounding only
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_fuse_is_the_normalised_geometric_mean():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 50, generator=g), torch.randn(1, 50, generator=g)
    lsm = torch.log_softmax
    assert torch.equal(pplm.fuse(a, b, 1.0), lsm(a, -1)) and torch.equal(pplm.fuse(a, b, 0.0), lsm(b, -1))
    assert torch.equal(pplm.fuse(a, a.clone(), 0.3), lsm(a, -1))
    p = lsm(a, -1).exp() ** 0.7 * lsm(b, -1).exp() ** 0.3
    torch.testing.assert_close(pplm.fuse(a, b, 0.7).exp(), p / p.sum(), atol=1e-6, rtol=1e-5)


def test_attribute_loss_decreases_over_the_iterations(tiny, bow):
    cfg = pplm.PPLMConfig(stepsize=0.02, iterations=4, kl_scale=0.0, gamma=1.0, max_new_tokens=3)
    for attr in (bow, pplm.probe_attribute(tiny, random_probe(tiny.d_model), 0)):
        res = pplm.generate(tiny, PROMPTS[0], attr, cfg)
        first = res.losses[0]
        assert len(first) == cfg.iterations + 1  # one per iteration, then after the last update
        assert all(later < earlier for earlier, later in zip(first, first[1:])), (attr.name, first)
    # the perturbation reaches the decoded distribution: a bigger step moves it away from the plain one
    big = pplm.generate(tiny, PROMPTS[0], bow, pplm.PPLMConfig(stepsize=0.5, gm_scale=1.0, max_new_tokens=1),
                        keep_dists=True)
    plain = _plain_logp(tiny, PROMPTS[0], big.token_ids)[0]
    ids = bow.token_ids
    assert float(torch.logsumexp(big.dists[0][ids], 0)) > float(torch.logsumexp(plain[ids], 0)) + 1e-3


def test_seeded_sampling_is_deterministic(tiny, bow):
    cfg = pplm.PPLMConfig(stepsize=0.05, temperature=1.0, seed=3, max_new_tokens=6)
    a = pplm.generate(tiny, PROMPTS[1], bow, cfg).token_ids
    assert a == pplm.generate(tiny, PROMPTS[1], bow, cfg).token_ids


def test_no_hooks_no_grads_and_parameters_unchanged(tiny, bow):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    attrs = [bow, pplm.probe_attribute(tiny, random_probe(tiny.d_model), 1)]
    cfg = pplm.PPLMConfig(stepsize=0.05, max_new_tokens=4)
    pplm.generate(tiny, PROMPTS[0], attrs, cfg)
    assert hook_count(tiny.model) == 0
    for name, p in tiny.model.named_parameters():
        assert p.grad is None, name
        assert torch.equal(p.detach(), before[name]), name

    def boom(done, total):
        if done == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pplm.generate(tiny, PROMPTS[0], attrs, cfg, progress=boom)
    assert hook_count(tiny.model) == 0

    calls = []

    def cancel():  # cancel in the middle of the gradient iterations of the second token
        calls.append(1)
        return len(calls) > 5

    res = pplm.generate(tiny, PROMPTS[0], attrs, cfg, cancel=cancel)
    assert res.cancelled and len(res.token_ids) == 1 and hook_count(tiny.model) == 0
    assert all(p.grad is None for p in tiny.model.parameters())


def test_bad_input(tiny, bow):
    with pytest.raises(UserError, match="unknown word list"):
        pplm.bag_of_words(tiny, "no-such-list")
    with pytest.raises(UserError, match="unknown word list"):
        pplm.bag_of_words(tiny, "../positive")
    with pytest.raises(UserError, match="empty"):
        pplm.bag_of_words(tiny, words=[" ", ""])
    with pytest.raises(UserError, match="single token"):
        pplm.bag_of_words(tiny, words=["zyxwvutsrqponm"])
    for bad in (dict(stepsize=-0.1), dict(gm_scale=1.5), dict(iterations=-1), dict(stepsize=float("nan")),
                dict(max_new_tokens=0)):
        with pytest.raises(UserError):
            pplm.generate(tiny, PROMPTS[0], bow, pplm.PPLMConfig(**bad))
    with pytest.raises(UserError, match="d_model"):
        pplm.probe_attribute(tiny, random_probe(16), 1)
    with pytest.raises(UserError, match="layer"):
        pplm.probe_attribute(tiny, random_probe(tiny.d_model, layer=9), 1)
    with pytest.raises(UserError, match="not a label"):
        pplm.probe_attribute(tiny, random_probe(tiny.d_model), "sideways")
    assert pplm.probe_attribute(tiny, random_probe(tiny.d_model), "down").target == 0
    with pytest.raises(UserError, match="prompt is empty"):
        pplm.generate(tiny, "  ", bow)
    with pytest.raises(UserError, match="not a PPLM attribute"):
        pplm.generate(tiny, PROMPTS[0], ["positive"])
    assert hook_count(tiny.model) == 0


def test_cli(tiny_dir, tmp_path, capsys):
    import json

    from steering_lab.cli import main

    words = tmp_path / "words.txt"
    words.write_text("\n".join([*pplm.read_words("positive"), "zyxwvutsrqponm"]))
    args = ["pplm", "--prompt", "Tell me about your weekend.", "--model", str(tiny_dir), "--max-new-tokens", "3"]
    assert main([*args, "--bow", "positive", "--words", str(words), "--stepsize", "0.02", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"unsteered", "pplm", "perplexity", "distinct2", "tokens_per_s"}
    assert main([*args, "--bow", "positive", "--stepsize", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    unsteered = next(x for x in lines if x.startswith("unsteered:")).split(":", 1)[1].strip()
    steered = next(x for x in lines if x.startswith("PPLM:")).split(":", 1)[1].strip()
    assert unsteered == steered  # step size 0: the same greedy answer
    for bad in (["--bow", "nope"], [], ["--bow", "positive", "--stepsize", "-1"], ["--probe", str(tmp_path / "x")],
                ["--bow", "positive", "--gm-scale", "2"]):
        assert main([*args, *bad]) == 2, bad
        assert capsys.readouterr().err.strip()


def test_app_callbacks(tiny, tmp_path):
    from steering_lab.ui.context import make_context
    from steering_lab.ui.method_pplm import attribute_choices, attribute_from_choice, run_pplm

    shipped = tmp_path / "shipped"
    random_probe(tiny.d_model).save(shipped / "probes" / "rnd")
    ctx = make_context(tiny, user_dir=tmp_path / "user", shipped_root=shipped)
    choices = attribute_choices(ctx)
    assert "words: positive" in choices and "probe: rnd → up" in choices and "probe: rnd → down" in choices
    assert attribute_from_choice(ctx, "probe: rnd → down").target == 0
    with pytest.raises(UserError):
        attribute_from_choice(ctx, "words: ../etc")
    ticks = []
    steps = list(run_pplm(ctx, PROMPTS[0], "probe: rnd → up", 0.0, 2, 0.01, 0.9, 4,
                          progress=lambda d, t: ticks.append(d)))
    base, steered, numbers = steps[-1]
    assert steps[0][0] == base and base == steered and "perplexity" in numbers and ticks[-1] == len(ticks)
    stopped = list(run_pplm(ctx, PROMPTS[0], "words: positive", 0.05, 3, 0.01, 0.9, 8, cancel=lambda: True))[-1]
    assert stopped[1] == "" and "stopped" in stopped[2] and hook_count(tiny.model) == 0
    # the app's Stop: a new run id for the session; the running loop sees it at its next forward pass
    run = ctx.new_run("visitor")
    out = list(run_pplm(ctx, PROMPTS[0], "words: positive", 0.05, 3, 0.01, 0.9, 8,
                        progress=lambda d, t: ctx.new_run("visitor") if d == 1 else None,
                        cancel=lambda: not ctx.is_current("visitor", run)))[-1]
    assert "1 PPLM tokens" in out[2] and "stopped" in out[2] and hook_count(tiny.model) == 0


@pytest.mark.real
def test_real_model_step_zero_and_bow_loss(smol):
    neg = pplm.bag_of_words(smol, "negative")
    assert len(neg.words) >= 50  # nearly every listed word is one token for SmolLM2
    p = "Tell me about your weekend."
    want = generate_ids(smol, [p], max_new_tokens=6)[0]
    assert pplm.generate(smol, p, neg, pplm.PPLMConfig(stepsize=0.0, max_new_tokens=6)).token_ids == want
    res = pplm.generate(smol, p, neg, pplm.PPLMConfig(stepsize=0.05, gamma=1.0, kl_scale=0.0, max_new_tokens=1))
    assert res.losses[0][-1] < res.losses[0][0]
    assert hook_count(smol.model) == 0
