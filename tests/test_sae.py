"""SAE features: sae-lens format round trip, hook -> layer mapping, fit checks, feature directions,
feature clamping through the transform operator, feature search; the shipped SAE on the real model."""

from __future__ import annotations

import math

import pytest
import torch

from steering_lab.errors import UserError
from steering_lab.intervene import Steer, capture, hook_count, steer
from steering_lab.sae import (
    LoadedSAE,
    build_index,
    clamp_codes,
    feature_clamp,
    feature_strip,
    feature_vector,
    hook_to_layer,
    layer_to_hook,
    load_sae,
    reconstruction_stats,
    save_sae,
    top_features,
    vector_features,
)
from steering_lab.vector import SteeringVector

TEXTS = ["The cat sat on the mat and looked at the garden.", "I love sunny days at the beach with friends.",
         "Please explain how the meeting will be organised tomorrow.", "What a terrible, rainy afternoon it was."]


def make_sae(d_in: int = 32, d_sae: int = 64, layer: int = 2, seed: int = 0, hook: str | None = None) -> LoadedSAE:
    """A random sae-lens StandardSAE (ReLU) reading ``layer``; features are roughly half active."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae,
                            metadata=SAEMetadata(hook_name=hook or layer_to_hook(layer), model_name="tiny-llama"))
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
        sae.W_enc.copy_(sae.W_enc + 0.05 * torch.randn_like(sae.W_enc))  # not just the transpose
    return LoadedSAE(sae=sae.eval(), layer=hook_to_layer(cfg.metadata.hook_name), hook_name=cfg.metadata.hook_name,
                     source="test", name="tiny-sae")


def orthogonal_sae(d: int = 32, layer: int = 2) -> LoadedSAE:
    """An exactly invertible SAE: W_dec orthogonal, W_enc = W_dec^T, every pre-activation positive
    (b_enc = 50), so encode(h + (s - f_i) W_dec[i])_i == s exactly (up to float error)."""
    sae = make_sae(d, d, layer)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        sae.sae.W_dec.copy_(q.T)
        sae.sae.W_enc.copy_(q)
        sae.sae.b_enc.fill_(50.0)
        sae.sae.b_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def sae():
    return make_sae()


def test_hook_names_map_to_block_outputs():
    assert hook_to_layer("blocks.9.hook_resid_post") == 9
    assert hook_to_layer("blocks.10.hook_resid_pre") == 9  # resid_pre of block k+1 == output of block k
    assert hook_to_layer("model.layers.12") == 12
    assert hook_to_layer("layers.3") == 3
    assert hook_to_layer("model.layers.5.output") == 5
    assert hook_to_layer("transformer.h.7") == 7
    assert hook_to_layer("hidden_states.4") == 3
    assert layer_to_hook(9) == "blocks.9.hook_resid_post" and hook_to_layer(layer_to_hook(9)) == 9
    for bad in ("blocks.0.hook_resid_pre", "blocks.3.attn.hook_z", "blocks.3.hook_mlp_out", "blocks.3.hook_resid_mid",
                "", "embed"):
        with pytest.raises(UserError):
            hook_to_layer(bad)


def test_save_load_round_trip_is_bit_exact(sae, tiny, tmp_path):
    out = save_sae(sae, tmp_path / "tiny-sae")
    assert (out / "cfg.json").is_file() and (out / "sae_weights.safetensors").is_file()
    back = load_sae(out, tiny)
    assert back.layer == 2 and back.hook_name == "blocks.2.hook_resid_post" and back.d_sae == 64
    a, b = sae.sae.state_dict(), back.sae.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # float16 on disk: the loaded tensors are exactly the float16 casts; the original is untouched
    from safetensors.torch import load_file

    half_dir = save_sae(sae, tmp_path / "half", dtype=torch.float16)
    on_disk = load_file(str(half_dir / "sae_weights.safetensors"))
    half = load_sae(half_dir, tiny)  # loaded as float32 (the default)
    for k, v in half.sae.state_dict().items():
        assert on_disk[k].dtype == torch.float16 and torch.equal(on_disk[k], a[k].half()), k
        assert v.dtype == torch.float32 and torch.equal(v, a[k].half().float()), k
    assert sae.sae.W_dec.dtype == torch.float32
    # saving again over an existing folder replaces it atomically
    save_sae(back, out)
    assert torch.equal(load_sae(out).sae.W_dec, a["W_dec"])


def test_sae_that_does_not_fit_is_refused(tiny, tmp_path):
    with pytest.raises(UserError, match="width 48"):
        load_sae(save_sae(make_sae(d_in=48), tmp_path / "wide"), tiny)
    with pytest.raises(UserError, match="layer 7"):
        load_sae(save_sae(make_sae(layer=7), tmp_path / "deep"), tiny)
    with pytest.raises(UserError, match="hook_z|block output"):
        load_sae(save_sae(make_sae(hook="blocks.1.attn.hook_z"), tmp_path / "attn"), tiny)
    with pytest.raises(UserError, match="no SAE folder"):
        load_sae(tmp_path / "missing", tiny)
    with pytest.raises(UserError, match="from the hub"):  # offline / unknown release: a clear error
        load_sae("no-such-release:blocks.0.hook_resid_post", tiny)


def test_feature_vector_is_the_decoder_row(sae, tiny, tmp_path):
    i = 5
    row = sae.sae.W_dec[i].detach().float()
    vec = feature_vector(sae, i, lm=tiny)
    assert vec.layers == [2] and vec.recommended_layer == 2 and vec.normalized
    torch.testing.assert_close(vec[2], row / row.norm(), rtol=0, atol=1e-7)
    raw = feature_vector(sae, i, normalize=False)
    assert torch.equal(raw[2], row)
    assert raw.extra["sae"]["feature"] == i and raw.method == "sae_feature"
    back = SteeringVector.load(vec.save(tmp_path / "feat"), tiny)  # a vector like any other
    assert torch.equal(back[2], vec[2]) and back.extra["sae"]["feature"] == i
    with pytest.raises(UserError):
        feature_vector(sae, 64)
    # steering with it adds s * u at block 2's output
    ids = torch.tensor([tiny.encode(TEXTS[0], special=True)])
    with torch.no_grad(), capture(tiny, [2]) as cap:
        tiny.model(input_ids=ids)
    with torch.no_grad(), steer(tiny, Steer(vec, 3.0)), capture(tiny, [2]) as cap2:
        tiny.model(input_ids=ids)
    torch.testing.assert_close(cap2.last(2) - cap.last(2), (3.0 * vec[2]).expand_as(cap.last(2)), rtol=0, atol=1e-5)


def test_clamp_at_current_activation_changes_nothing(sae, tiny):
    ids = torch.tensor([tiny.encode(TEXTS[1], special=True)])
    with torch.no_grad(), capture(tiny, [2]) as cap:
        tiny.model(input_ids=ids)
    h = cap.last(2)
    f = sae.encode(h)
    i = int((f[0] > 0).float().sum(0).argmax())  # a feature active on many tokens
    new, f0, f1 = clamp_codes(sae, h, i, f[..., i])  # per-token value == current activation
    assert torch.equal(new, h)
    new, f0, f1 = clamp_codes(sae, h, i, 2.5)
    assert torch.all(f1[..., i] == 2.5)
    torch.testing.assert_close(new - h, sae.decode(f1) - sae.decode(f0), rtol=0, atol=1e-6)
    # through the hook, one token (strength is per row): s = f_i gives the same logits (tolerance 1e-5)
    one = ids[:, :1]
    with torch.no_grad():
        base = tiny.model(input_ids=one).logits
        with capture(tiny, [2]) as c1:
            tiny.model(input_ids=one)
        fi = float(sae.encode(c1.last(2))[0, 0, i])
        with steer(tiny, feature_clamp(sae, i, fi)):
            same = tiny.model(input_ids=one).logits
        with steer(tiny, feature_clamp(sae, i, fi + 5.0)):
            moved = tiny.model(input_ids=one).logits
    torch.testing.assert_close(same, base, rtol=0, atol=1e-5)
    assert float((moved - base).abs().max()) > 1e-3
    assert hook_count(tiny.model) == 0


def test_clamped_feature_reads_back_as_the_strength(tiny):
    sae = orthogonal_sae()
    ids = torch.tensor([tiny.encode(t, special=True)[:8] for t in TEXTS[:2]])
    i = 3
    with torch.no_grad(), steer(tiny, feature_clamp(sae, i, [1.5, 42.0])), capture(tiny, [2]) as cap:
        tiny.model(input_ids=ids)
    f = sae.encode(cap.last(2))
    torch.testing.assert_close(f[0, :, i], torch.full((8,), 1.5), rtol=0, atol=1e-4)
    torch.testing.assert_close(f[1, :, i], torch.full((8,), 42.0), rtol=0, atol=1e-4)
    # only_active leaves positions where the feature is off alone (here: all are on, so all move)
    with torch.no_grad(), capture(tiny, [2]) as c0:
        tiny.model(input_ids=ids)
    others = [j for j in range(sae.d_sae) if j != i]
    torch.testing.assert_close(f[..., others], sae.encode(c0.last(2))[..., others], rtol=0, atol=1e-4)


def test_vector_features_finds_the_feature(sae):
    vec = feature_vector(sae, 11)
    top = vector_features(sae, vec, k=5)
    assert top[0]["feature"] == 11 and math.isclose(top[0]["cosine"], 1.0, abs_tol=1e-4)
    assert len(top) == 5 and all(abs(a["cosine"]) >= abs(b["cosine"]) for a, b in zip(top, top[1:]))
    neg = vector_features(sae, -vec, k=1)
    assert neg[0]["feature"] == 11 and math.isclose(neg[0]["cosine"], -1.0, abs_tol=1e-4)
    with pytest.raises(UserError, match="layer 2"):
        vector_features(sae, SteeringVector({0: torch.ones(32)}))


def test_feature_search(sae, tiny):
    top = top_features(tiny, sae, TEXTS[0], k=5)
    assert 0 < len(top) <= 5 and all(a["max_act"] >= b["max_act"] for a, b in zip(top, top[1:]))
    i = top[0]["feature"]
    tokens, values = feature_strip(tiny, sae, TEXTS[0], i)
    assert len(tokens) == len(values) == len(tiny.encode(TEXTS[0], special=True))
    assert math.isnan(values[0]) and math.isclose(max(values[1:]), top[0]["max_act"], rel_tol=1e-3, abs_tol=1e-3)
    index = build_index(tiny, sae, TEXTS, top_n=4, batch_size=3)
    feats = index["features"]
    assert index["n_tokens"] == sum(len(tiny.encode(t, special=True)) - 1 for t in TEXTS)
    assert 0 <= index["dead_fraction"] < 1 and str(i) in feats
    info = feats[str(i)]
    assert info["label"] and info["top_tokens"] and 0 < info["freq"] <= 1 and len(info["contexts"]) <= 3
    assert "[[" in info["contexts"][0]["text"]
    assert info["max_act"] >= top[0]["max_act"] - 1e-3
    stats = reconstruction_stats(tiny, sae, TEXTS)
    assert stats["n_tokens"] == index["n_tokens"] and stats["explained_variance"] <= 1.0
    with pytest.raises(UserError):
        top_features(tiny, sae, "  ")


def test_features_tab_functions(sae, tiny, tmp_path):
    from steering_lab.generate import generate
    from steering_lab.ui.context import make_context
    from steering_lab.ui.features_tab import clamp_compare, feature_details, feature_rows, save_feature_vector

    index = {"features": {"3": {"label": "cat / dog", "top_tokens": [" cat", " dog"], "freq": 0.01, "max_act": 2.0,
                                "contexts": [{"act": 2.0, "text": "the [[ cat]] sat"}]},
                          "7": {"label": "the", "top_tokens": [" the"], "freq": 0.2, "max_act": 1.0, "contexts": []}}}
    assert [r[0] for r in feature_rows(index)] == [7, 3]  # most frequent first
    assert [r[0] for r in feature_rows(index, "DOG")] == [3] and [r[0] for r in feature_rows(index, "7")] == [7]
    assert "<b><u> cat</u></b>" in feature_details(index, 3) and "never fired" in feature_details(index, 5)
    ctx = make_context(tiny, user_dir=tmp_path / "lib", shipped_root=tmp_path / "none", library_mode="shared")
    name = save_feature_vector(ctx, sae, 9, "")
    assert name == "sae-tiny-sae-f9" and name in ctx.compatible_vectors()
    assert torch.equal(ctx.vectors.get(name)[2], feature_vector(sae, 9)[2])
    assert save_feature_vector(ctx, sae, 9, "") == name  # saving the same feature again overwrites the user's copy
    base, clamped = clamp_compare(ctx, sae, "Tell me a story.", 9, 25.0, max_new_tokens=6)
    assert base == generate(tiny, ["Tell me a story."], max_new_tokens=6)[0]  # the unclamped row is untouched
    assert isinstance(clamped, str)


# ---- the shipped SAE on the real model ---------------------------------------------------------

HELD_OUT = [  # written for this test: never part of the SAE's training text
    "The lighthouse keeper climbed the spiral stairs every evening to light the lamp before the storm.",
    "To install the package, run the installer and then restart your computer when it asks you to.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):",
    "My grandmother used to bake bread on Sundays; the whole house smelled of it by noon.",
    "This license grants you the right to copy and distribute the software, provided this notice is kept.",
    "How do I politely tell my neighbour that their dog barks all night?",
]


@pytest.fixture(scope="module")
def shipped(smol):
    from steering_lab.sae import sae_names

    names = sae_names()
    assert names, "no shipped SAE"
    return load_sae(names[0], smol)


@pytest.mark.real
def test_shipped_sae_fits_and_reconstructs(smol, shipped):
    assert shipped.d_in == smol.d_model and 0 <= shipped.layer < smol.n_layers
    assert shipped.sae.W_dec.dtype == torch.float32  # float16 on disk, float32 in memory
    stats = reconstruction_stats(smol, shipped, HELD_OUT)
    assert stats["explained_variance"] >= 0.7, stats  # 0.80 measured; the bench: 0.865 on 77k held-out tokens
    assert 1 <= stats["l0"] <= 200, stats
    assert feature_vector(shipped, 829).recommended_strength == 32.0  # measured by bench/sae.py, in features.json
    labels = [f["label"] for f in shipped.index["features"].values()]
    assert len(labels) > shipped.d_sae // 2 and all(labels)


@pytest.mark.real
def test_shipped_sae_clamp_identity_on_the_real_model(smol, shipped):
    ids = torch.tensor([smol.encode("Hello", special=True)])
    with torch.no_grad(), capture(smol, [shipped.layer]) as cap:
        base = smol.model(input_ids=ids).logits
    f = shipped.encode(cap.last(shipped.layer))[0, -1]
    i = int(f.argmax())
    with torch.no_grad(), steer(smol, feature_clamp(shipped, i, float(f[i]))):
        same = smol.model(input_ids=ids).logits
    torch.testing.assert_close(same, base, rtol=0, atol=1e-4)


@pytest.mark.real
def test_shipped_sae_in_the_app_helpers(smol):
    from steering_lab.ui.context import make_context
    from steering_lab.ui.features_tab import compatible_saes, vector_features_markdown

    ctx = make_context(smol, library_mode="shared")
    assert "smollm2-135m-l10" in compatible_saes(ctx)
    md = vector_features_markdown(ctx, "sentiment")
    assert "smollm2-135m-l10" in md and "wonderful" in md  # the sentiment vector loads on a positive-words feature


@pytest.mark.real
@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="Debian's chromium is not installed")
def test_features_tab_in_a_browser(smol, tmp_path):
    """Search the feature table, light up a prompt (table + feature strip), then 'Steer with this
    feature' and find it selected in the Steer tab's vector picker."""
    import socket

    from bench.browser import browser_page
    from steering_lab.ui.app import CSS, build_demo
    from steering_lab.ui.context import make_context

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = make_context(smol, user_dir=tmp_path, library_mode="shared")
    demo = build_demo(ctx)
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=port, quiet=True, css=CSS)
    try:
        with browser_page(url) as page:
            page.get_by_role("tab", name="Features").click()
            page.fill("#feature-search textarea", "wonderful")
            page.wait_for_function("() => document.querySelector('#feature-table').innerText.includes('rewarding')",
                                   timeout=30_000)
            page.fill("#feature-prompt textarea", "What a wonderful, sunny day at the beach!")
            page.get_by_role("button", name="Find features").click()
            page.wait_for_function("() => document.querySelectorAll('#feature-strip span').length > 5",
                                   timeout=60_000)
            assert "beach" in page.inner_text("#prompt-features")
            page.fill("#feature-id input", "829")
            page.get_by_role("button", name="Steer with this feature").click()
            page.wait_for_function("() => document.body.innerText.includes('sae-smollm2-135m-l10-f829')",
                                   timeout=60_000)
            page.get_by_role("tab", name="Steer").click()
            assert "sae-smollm2-135m-l10-f829" in page.inner_text("#vectors")
    finally:
        demo.close()
    assert "sae-smollm2-135m-l10-f829" in ctx.vectors.names()
