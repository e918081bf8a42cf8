"""Function vectors (directions/function_vectors.py): exact invariants on the tiny model, the task
files, bad input, and a short real-model check."""

import json

import pytest
import torch

from steering_lab.activations import pad_left
from steering_lab.directions import function_vectors as F
from steering_lab.errors import UserError
from steering_lab.intervene import head_output_weight, head_shape, head_site, heads, hook_count
from steering_lab.vector import SteeringVector

WORDS = ["hot", "cold", "big", "small", "fast", "slow", "happy", "sad", "light", "dark", "old", "young", "rich",
         "poor", "early", "late", "strong", "weak", "high", "low", "open", "closed", "good", "bad", "wet", "dry"]
PAIRS = [(WORDS[i], WORDS[i + 1]) for i in range(0, len(WORDS), 2)] + \
        [(WORDS[i + 1], WORDS[i]) for i in range(0, len(WORDS), 2)]  # 26 pairs


# ---- data ------------------------------------------------------------------------------
def test_task_files_parse_and_are_large_enough():
    names = F.task_names()
    assert len(names) >= 4
    for name in names:
        task = F.load_task(name)
        assert task.name == name
        lines = [json.loads(x) for x in (F.TASK_DIR / f"{name}.jsonl").read_text().splitlines() if x.strip()]
        assert len(lines) == len(task.pairs)  # no duplicate inputs were silently dropped
        assert len({x for x, _ in task.pairs}) >= 50
        assert all(x and y and x != y for x, y in task.pairs)


@pytest.mark.real
def test_task_answers_are_identified_by_their_first_token(smol):
    for name in F.task_names():
        assert F.token_problems(smol, F.load_task(name).pairs) == [], name


def test_token_problems_finds_copies_and_shared_first_tokens(tiny):
    probs = F.token_problems(tiny, [("hot", "hot"), ("big", "small"), ("old", "small")])
    assert len(probs) == 2 and "input's first token" in probs[0] and "shared" in probs[1]


# ---- splits and prompts ----------------------------------------------------------------------
def test_splits_are_seeded_and_disjoint():
    task = F.load_task("antonym")
    a, b, c = F.split_task(task, 0), F.split_task(task, 0), F.split_task(task, 1)
    assert a == b and a != c
    for s in (a, c):
        tr, va, te = ({x for x, _ in part} for part in (s.train, s.valid, s.test))
        assert not (tr & va or tr & te or va & te)
        assert len(tr) + len(va) + len(te) == len(task.pairs)
        assert min(len(tr), len(va), len(te)) >= 10


def test_prompts_are_deterministic_and_never_show_the_query():
    one = F.build_prompts(PAIRS, 20, 5, seed=3)
    assert one == F.build_prompts(PAIRS, 20, 5, seed=3)
    assert one != F.build_prompts(PAIRS, 20, 5, seed=4)
    for p in one:
        lines = p.text.split("\n")
        assert len(lines) == 6 and lines[-1] == f"{p.query}:" and (p.query, p.answer) in PAIRS
        demos = [tuple(x.split(": ")) for x in lines[:-1]]
        assert all(d in PAIRS for d in demos) and p.query not in [d[0] for d in demos]
    bad = F.build_prompts(PAIRS, 20, 5, seed=3, shuffle_labels=True)
    for p, q in zip(one, bad):  # same demonstration inputs and labels, labels permuted; the answer is kept
        assert (p.query, p.answer) == (q.query, q.answer)
        dp = [x.split(": ") for x in p.text.split("\n")[:-1]]
        dq = [x.split(": ") for x in q.text.split("\n")[:-1]]
        assert [x for x, _ in dp] == [x for x, _ in dq] and sorted(y for _, y in dp) == sorted(y for _, y in dq)
    assert any(p.text != q.text for p, q in zip(one, bad))
    # evaluation prompts: held-out queries, demonstrations from the train split only
    s = F.split_task(F.load_task("antonym"), 0)
    train_inputs = {x for x, _ in s.train}
    ev = F.build_prompts(s.train, 0, 4, seed=1, queries=s.test)
    assert [p.query for p in ev] == [x for x, _ in s.test]
    for p in ev:
        assert all(line.split(": ")[0] in train_inputs for line in p.text.split("\n")[:-1])
    assert F.icl_text([], "fast") == "fast:"


def test_bad_input(tiny, tmp_path):
    with pytest.raises(UserError, match="unknown task"):
        F.load_task("no_such_task")
    with pytest.raises(UserError, match="unknown task"):
        F.load_task("..")
    with pytest.raises(UserError, match="no pairs"):
        F.load_task([])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no pairs"):
        F.load_task(str(empty))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"input": "a", "output": "b"}\nnot json\n')
    with pytest.raises(UserError, match="line 2"):
        F.load_task(str(broken))
    with pytest.raises(UserError, match="no task file"):
        F.load_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="need 11"):
        F.build_prompts(PAIRS[:10], 4, 10)
    with pytest.raises(UserError, match="too few for 12-shot"):  # 26 pairs: 10 in train
        F.head_stats(tiny, PAIRS, shots=12)
    with pytest.raises(UserError, match="at least 6"):
        F.split_task(F.load_task(PAIRS[:4]))
    with pytest.raises(UserError, match="unknown split"):
        F.evaluate(tiny, PAIRS, split="dev")
    with pytest.raises(UserError, match="unknown scope"):
        F.function_vector(tiny, PAIRS, scope="middle")
    with pytest.raises(UserError, match="top heads"):
        F.top_heads(torch.zeros(4, 4), 17)
    vec = SteeringVector({1: torch.ones(tiny.d_model)})  # no recommended layer
    with pytest.raises(UserError, match="which layer"):
        F.evaluate(tiny, PAIRS, vec)
    assert hook_count(tiny.model) == 0


# ---- exact invariants on the tiny model ----------------------------------------------------------
def test_head_sum_equals_sum_of_per_head_contributions(tiny):
    n_heads, head_dim = head_shape(tiny)
    g = torch.Generator().manual_seed(0)
    means = torch.randn(tiny.n_layers, n_heads, head_dim, generator=g)
    chosen = [(0, 1), (2, 3), (2, 0), (3, 2)]
    each = F.head_contributions(tiny, means, chosen)
    assert each.shape == (4, tiny.d_model)
    for (k, h), row in zip(chosen, each):  # one head alone through the block's own output projection
        z = torch.zeros(1, 1, n_heads * head_dim)
        z[0, 0, h * head_dim:(h + 1) * head_dim] = means[k, h]
        site = head_site(tiny.layers[k])
        with torch.no_grad():
            want = site(z)[0, 0] - site(torch.zeros_like(z))[0, 0]  # bias (if any) cancels
        torch.testing.assert_close(row, want, rtol=0, atol=1e-6)
    # all chosen heads of a block at once == the sum of their single-head rows
    with torch.no_grad():
        z = torch.zeros(1, 1, n_heads, head_dim)
        z[0, 0, [3, 0]] = means[2, [3, 0]]
        both = z.reshape(1, 1, -1) @ head_output_weight(tiny, 2).T
    torch.testing.assert_close(both[0, 0], each[1] + each[2], rtol=0, atol=1e-6)
    fv = F.head_contributions(tiny, means, chosen).sum(0)
    assert torch.equal(fv, each.sum(0))


def test_aie_of_a_head_patched_with_its_own_clean_activation_is_exactly_zero(tiny):
    prompts = F.build_prompts(PAIRS, 6, 3, seed=0)
    own = F.last_token_heads(tiny, prompts, batch_size=4)
    assert own.shape == (6, tiny.n_layers, *head_shape(tiny))
    aie = F.indirect_effects(tiny, prompts, own, batch_size=4)
    assert torch.equal(aie, torch.zeros_like(aie))
    # another prompt set's mean is not a no-op: the measurement can fail
    other = F.mean_head_activations(tiny, F.build_prompts(PAIRS, 6, 3, seed=1, shuffle_labels=True))
    assert F.indirect_effects(tiny, prompts, other, batch_size=4).abs().max() > 0
    assert hook_count(tiny.model) == 0


def test_aie_from_the_cached_last_token_equals_a_full_forward(tiny):
    """The KV-cache shortcut against the plain definition: full forward passes, patch at the last position."""
    prompts = F.build_prompts(PAIRS, 5, 3, seed=2, shuffle_labels=True)
    mean = F.mean_head_activations(tiny, F.build_prompts(PAIRS, 8, 3, seed=5))
    aie = F.indirect_effects(tiny, prompts, mean, layers=[1, 3], batch_size=2)
    assert torch.equal(aie[[0, 2]], torch.zeros(2, aie.shape[1]))  # layers not measured
    seqs = [tiny.encode(p.text, special=True) for p in prompts]
    ids, mask, pos = pad_left(seqs, tiny.pad_id)
    target = torch.tensor([F.answer_token(tiny, p.answer) for p in prompts])

    def prob(edit=None):
        with torch.no_grad(), heads(tiny, [], read=False, edit=edit or {}):
            out = tiny.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        return out.float().softmax(-1).gather(1, target[:, None])[:, 0]

    base = prob()
    for k, h in [(1, 0), (3, 2)]:
        def patch(z, k=k, h=h):
            z = z.clone()
            z[:, -1, h] = mean[k, h]
            return z
        want = (prob({k: patch}) - base).mean()
        assert abs(float(aie[k, h]) - float(want)) < 1e-5


def test_strength_zero_is_unsteered_and_scope_last_touches_only_the_last_token(tiny):
    texts = ["hot:", "big:", "happy:", "old:"]
    vec = SteeringVector({2: torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(1)) * 5},
                         method="function_vector", recommended_layer=2, recommended_strength=1.0)
    plain = F.first_token_logits(tiny, texts)
    assert torch.equal(F.first_token_logits(tiny, texts, vec, strength=0.0), plain)
    steered = F.first_token_logits(tiny, texts, vec)
    assert not torch.allclose(steered, plain)
    # a function vector may be added at a layer it was not stored at
    assert not torch.allclose(F.first_token_logits(tiny, texts, vec, layer=0), steered)
    # batched (left padded) == one at a time, within float tolerance
    alone = torch.cat([F.first_token_logits(tiny, [t], vec) for t in texts])
    torch.testing.assert_close(steered, alone, rtol=0, atol=1e-5)
    # scope "last" == the vector added by hand at the last position only
    seqs = [tiny.encode(t, special=True) for t in texts]
    ids, mask, pos = pad_left(seqs, tiny.pad_id)

    def add_last(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[:, -1] += vec[2]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = tiny.layers[2].register_forward_hook(add_last)  # test-only reference, removed at once
    try:
        with torch.no_grad():
            ref = tiny.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].log_softmax(-1)
    finally:
        handle.remove()
    torch.testing.assert_close(steered, ref, rtol=0, atol=1e-5)
    every = F.first_token_logits(tiny, texts, vec, scope="all")
    assert not torch.allclose(every, steered)
    assert hook_count(tiny.model) == 0


def test_function_vector_end_to_end_on_tiny(tiny, tmp_path):
    calls = []
    vec = F.function_vector(tiny, PAIRS, shots=3, n_heads=3, n_clean=6, n_corrupt=4, strengths=(1.0, 2.0),
                            progress=lambda f, text: calls.append(f))
    assert vec.method == "function_vector" and vec.dataset == "custom"
    assert vec.layers == list(range(0, tiny.n_layers, 2)) and vec.recommended_layer in vec.layers
    assert vec.recommended_strength in (1.0, 2.0)
    assert vec.extra["selection_split"] == "valid" and len(vec.extra["heads"]) == 3
    assert all(torch.equal(vec[k], vec[0]) for k in vec.layers)  # one residual-stream vector at every layer
    assert calls and calls == sorted(calls) and calls[-1] == 1.0
    # the same numbers from the measured statistics, by hand
    stats = F.head_stats(tiny, PAIRS, shots=3, n_clean=6, n_corrupt=4)
    chosen = F.top_heads(stats.aie, 3)
    assert [list(h) for h in chosen] == vec.extra["heads"]
    torch.testing.assert_close(vec[0], F.head_contributions(tiny, stats.means, chosen).sum(0), rtol=0, atol=1e-6)
    again = F.function_vector(tiny, PAIRS, shots=3, n_heads=3, stats=stats, strengths=(1.0, 2.0), layers=[1, 3],
                              select_on="shuffled")
    assert torch.equal(again[1], vec[0]) and again.layers == [1, 3] and again.extra["selection_prompts"] == "shuffled"
    sw = F.sweep(tiny, F.load_task(PAIRS), vec[0], layers=[again.recommended_layer],
                 strengths=(again.recommended_strength,), select_on="shuffled", shots=3)
    assert sw.accuracy == again.extra["valid_accuracy"]  # the recorded number is reproducible
    with pytest.raises(UserError, match="select_on"):
        F.function_vector(tiny, PAIRS, stats=stats, select_on="icl")
    path = vec.save(tmp_path / "fv")
    back = SteeringVector.load(path, tiny)
    assert back.method == "function_vector" and back.extra["heads"] == vec.extra["heads"]
    r = F.evaluate(tiny, PAIRS, back)
    assert 0.0 <= r.accuracy <= 1.0 and r.n == len(F.split_task(F.load_task(PAIRS)).test) == len(r.predictions)
    assert hook_count(tiny.model) == 0


@pytest.mark.real
def test_real_model_icl_beats_zero_shot_on_antonyms(smol):
    zero = F.evaluate(smol, "antonym")
    icl = F.evaluate(smol, "antonym", shots=5)
    assert icl.accuracy >= zero.accuracy + 0.3, (zero.accuracy, icl.accuracy)


# ---- CLI ---------------------------------------------------------------------------------------------
def test_cli_fv(tiny_dir, tmp_path, capsys):
    from steering_lab.cli import main

    task = tmp_path / "pairs.jsonl"
    task.write_text("".join(json.dumps({"input": x, "output": y}) + "\n" for x, y in PAIRS))
    assert main(["fv", "tasks", "--json"]) == 0
    listed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["task"] for r in listed] == F.task_names() and all(r["pairs"] >= 50 for r in listed)
    small = ["--model", str(tiny_dir), "--task", str(task), "--shots", "3", "--n-clean", "4", "--n-corrupt", "3"]
    assert main(["fv", "heads", *small, "-k", "5", "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 5 and [r["aie"] for r in rows] == sorted((r["aie"] for r in rows), reverse=True)
    out = tmp_path / "fv"
    assert main(["fv", "extract", *small, "--n-heads", "2", "--select-on", "shuffled", "--out", str(out)]) == 0
    vec = SteeringVector.load(out)
    assert vec.method == "function_vector" and vec.dataset == "pairs" and len(vec.extra["heads"]) == 2
    assert vec.extra["selection_prompts"] == "shuffled"
    capsys.readouterr()
    assert main(["fv", "eval", "--model", str(tiny_dir), "--task", str(task), "--vector", str(out), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["layer"] == vec.recommended_layer and 0 <= row["accuracy"] <= 1 and row["n"] > 0
    assert main(["fv", "eval", "--model", str(tiny_dir), "--task", str(task), "--vector", str(out), "--shots", "3",
                 "--shuffled", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["shuffled"] and row["shots"] == 3
    assert main(["fv", "eval", "--task", str(task), "--shuffled"]) == 2  # shuffled needs shots
    assert main(["fv", "heads"]) == 2  # no --task: one line, exit 2
    assert main(["fv", "eval", "--task", "no_such_task"]) == 2
    assert main(["fv", "extract", "--task", "antonym"]) == 2  # no --out


# ---- app ---------------------------------------------------------------------------------------------
def test_app_callbacks(tiny, tmp_path):
    import gradio as gr

    from steering_lab.ui import method_function_vectors as ui
    from steering_lab.ui.context import make_context

    ctx = make_context(tiny, user_dir=tmp_path / "user", shipped_root=tmp_path / "shipped")
    seen = []
    stats, fig = ui.measure_heads(ctx, "antonym", shots=3, n_clean=4, n_corrupt=3, n_heads=2,
                                  progress=lambda f, text: seen.append(f))
    assert stats.aie.shape == (tiny.n_layers, head_shape(tiny)[0]) and seen and max(seen) <= 1.0
    assert list(fig.data[0].z[0]) == stats.aie[0].tolist() and len(fig.data[1].x) == 2  # heat map + 2 ringed heads
    saved, text, fig2 = ui.build_and_save(ctx, stats, n_heads=2, name="", shots_baseline=2, select_on="shuffled")
    assert saved == "fv-antonym" and saved in ctx.compatible_vectors()
    vec = ctx.vectors.get(saved)
    assert vec.method == "function_vector" and vec.dataset == "antonym"
    assert "zero-shot + function vector" in text and "2-shot" in text and "3-shot, labels shuffled +" in text
    assert vec.extra["selection_prompts"] == "shuffled"
    with pytest.raises(UserError, match="exists"):
        ui.build_and_save(ctx, stats, n_heads=2, name="fv-antonym")
    with pytest.raises(UserError, match="find the heads"):
        ui.build_and_save(ctx, None)
    with pytest.raises(UserError, match="choose a task"):
        ui.measure_heads(ctx, "")
    with gr.Blocks():
        out = ui.build(ctx, {"vectors": gr.Dropdown(multiselect=True)})
    assert "task" in out and ui.WHERE == "extract" and ui.TITLE == "Function vectors"
