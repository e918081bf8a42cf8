"""Cross-lingual refusal (measure/crosslingual.py): the bundled multilingual data, the multilingual
refusal judge, the separation/geometry analysis on a tiny model with exact invariants (a negated
direction mirrors its AUROC; the English row is what the existing probe/refusal code computes), the
interventions (strength 0 is no steering), bad input, the CLI and the app's callback."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from steering_lab.errors import UserError
from steering_lab.measure import crosslingual as cl
from steering_lab.metrics import is_refusal as english_is_refusal
from steering_lab.probes import Probe, score_texts_with_probe
from steering_lab.vector import SteeringVector

DATA = Path(cl.__file__).resolve().parents[1] / "data" / "crosslingual"
EXPECTED_SCRIPT = {"fr": "latin", "de": "latin", "es": "latin", "zh": "cjk", "ru": "cyrillic"}


# ---- data -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("lang", cl.OTHER_LANGUAGES)
def test_language_files_parse_unique_disjoint_and_in_their_script(lang):
    harmful, harmless = cl.load_language(lang)
    for side in (harmful, harmless):
        assert len(side) >= 40 and len(set(side)) == len(side)
        assert all(line == line.strip() and line and not line.startswith("#") for line in side)
    assert not set(harmful) & set(harmless)
    script = EXPECTED_SCRIPT[lang]
    assert cl.LANGUAGE_SCRIPT[lang] == script
    for side in (harmful, harmless):
        shares = [cl.script_share(t, script) for t in side]
        assert sum(shares) / len(shares) >= 0.95, (lang, min(shares))
        assert min(shares) >= 0.6, (lang, side[shares.index(min(shares))])
    if script == "latin":  # the Latin-script files are not English: each has its own accents or words
        marks = {"fr": "éèàçêù", "de": "äöüß", "es": "ñ¿¡áéíóú"}[lang]
        assert sum(any(c in t.lower() for c in marks) for t in harmful + harmless) >= 20


def test_language_files_are_not_the_english_lines_and_the_folder_has_only_the_documented_files():
    from steering_lab.datasets import harmful_instructions, harmless_instructions

    english = set(harmful_instructions()) | set(harmless_instructions())
    names = {p.name for p in DATA.iterdir() if p.is_file()}
    assert names == {"README.md"} | {f"{c}_{s}.txt" for c in cl.OTHER_LANGUAGES for s in cl.SIDES}
    for lang in cl.OTHER_LANGUAGES:
        assert not english & set(sum(cl.load_language(lang), []))


def test_script_share_counts_letters_only():
    assert cl.script_share("你好, world!", "cjk") == pytest.approx(2 / 7)
    assert cl.script_share("Привет", "cyrillic") == 1.0 and cl.script_share("123 ?!", "latin") == 0.0
    with pytest.raises(UserError, match="unknown script"):
        cl.script_share("x", "runic")


def test_english_is_the_bundled_test_split():
    from steering_lab.datasets import instruction_split

    assert cl.load_language("en") == instruction_split("test")


def test_bad_languages_and_files(tmp_path):
    with pytest.raises(UserError, match="unknown language 'xx'"):
        cl.parse_languages("fr,xx")
    with pytest.raises(UserError, match="unknown language"):
        cl.load_language("klingon")
    with pytest.raises(UserError, match="no language"):
        cl.load_language("  ")
    assert cl.parse_languages(" FR, de ,fr,") == ["fr", "de"]
    assert cl.parse_languages(None) == list(cl.OTHER_LANGUAGES) == cl.parse_languages("")
    (tmp_path / "fr_harmful.txt").write_text("Une ligne.\n", encoding="utf-8")
    with pytest.raises(UserError, match="no data file fr_harmless.txt"):
        cl.load_language("fr", tmp_path)
    (tmp_path / "fr_harmless.txt").write_text("\n   \n\n", encoding="utf-8")
    with pytest.raises(UserError, match="fr_harmless.txt holds no examples"):
        cl.load_language("fr", tmp_path)
    (tmp_path / "fr_harmless.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="not UTF-8"):
        cl.load_language("fr", tmp_path)


# ---- the judge ------------------------------------------------------------------------------------

REFUSALS = {
    "en": ["I'm sorry, but I can't help with that.", "As an AI, I will not provide instructions for this."],
    "fr": ["Je suis désolé, mais je ne peux pas vous aider avec cette demande.",
           "Désolée, mais c'est illégal et je refuse d'expliquer cela."],
    "de": ["Es tut mir leid, aber dabei kann ich nicht helfen.",
           "Als KI bin ich nicht in der Lage, solche Anleitungen zu geben."],
    "es": ["Lo siento, pero no puedo ayudarte con eso.", "Como inteligencia artificial, me niego a explicar esto."],
    "zh": ["抱歉，我不能帮助你做这件事。", "作为人工智能，我无法提供这类信息，这是违法的。"],
    "ru": ["Извините, но я не могу помочь с этим запросом.", "Как ИИ, я отказываюсь давать такие инструкции."],
}
ANSWERS = {
    "en": ["Sure! Mix flour, water and salt, then knead the dough for ten minutes.",
           "The sky looks blue because air scatters short wavelengths more."],
    "fr": ["Bien sûr ! Pour une quiche, mélangez les œufs, la crème et les lardons.",
           "Le ciel est bleu parce que l'air diffuse davantage la lumière bleue."],
    "de": ["Gern! Für einen Apfelkuchen brauchst du Mehl, Butter, Zucker und Äpfel.",
           "Der Himmel ist blau, weil die Luft kurzwelliges Licht stärker streut."],
    "es": ["¡Claro! Para la tortilla necesitas patatas, huevos, aceite y sal.",
           "El cielo es azul porque el aire dispersa más la luz de onda corta."],
    "zh": ["当然可以！先把鸡蛋打散，再和西红柿一起翻炒。", "天空是蓝色的，因为空气更容易散射短波长的光。"],
    "ru": ["Конечно! Для борща понадобятся свёкла, капуста, картофель и морковь.",
           "Небо голубое, потому что воздух сильнее рассеивает короткие волны."],
}


@pytest.mark.parametrize("lang", list(cl.LANGUAGES))
def test_judge_recognises_refusals_in_each_language_and_not_ordinary_answers(lang):
    for text in REFUSALS[lang]:
        assert cl.is_refusal(text, [lang]) and cl.is_refusal(text)
        assert cl.is_refusal(text.upper() if lang not in ("zh",) else text, [lang])
    for text in ANSWERS[lang]:
        assert not cl.is_refusal(text) and not cl.is_refusal(text, [lang])
    # the model may answer in English whatever the prompt's language: English is always judged
    assert cl.is_refusal(REFUSALS["en"][0], [lang])
    assert cl.refusal_rate(REFUSALS[lang] + ANSWERS[lang], [lang]) == 0.5


def test_judge_keeps_english_behaviour_and_needs_the_language_for_foreign_phrases():
    assert cl.refusal_phrases(["en"]) == tuple(dict.fromkeys(cl.REFUSAL_PHRASES["en"]))
    for text in REFUSALS["en"] + ANSWERS["en"]:
        assert cl.is_refusal(text, ["en"]) == english_is_refusal(text)
    assert not cl.is_refusal(REFUSALS["ru"][0], ["en"]) and not english_is_refusal(REFUSALS["fr"][0])
    assert cl.is_refusal("Je suis désolé, mais " + "x " * 100, ["fr"], opening=True)
    assert not cl.is_refusal("x " * 100 + "je suis désolé", ["fr"], opening=True)
    with pytest.raises(UserError):
        cl.refusal_rate([], ["fr"])
    with pytest.raises(UserError, match="unknown language"):
        cl.is_refusal("text", ["xx"])


# ---- the analysis on a tiny model -------------------------------------------------------------------

def _tiny_vector(lm, layer=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    dirs = {k: torch.randn(lm.d_model, generator=g) for k in range(lm.n_layers)}
    return SteeringVector(directions={k: v / v.norm() for k, v in dirs.items()}, model=lm.name, d_model=lm.d_model,
                          n_layers=lm.n_layers, method="mean_diff", recommended_layer=layer, recommended_strength=4.0,
                          normalized=True)


def _tiny_probe(lm, layer=1, pooling="last", seed=2):
    g = torch.Generator().manual_seed(seed)
    d = lm.d_model
    return Probe(layer=layer, pooling=pooling, weight=torch.randn(d, generator=g), mean=torch.randn(d, generator=g),
                 scale=torch.rand(d, generator=g) + 0.5, bias=torch.zeros(1), model=lm.name, d_model=d)


@pytest.fixture(scope="module")
def tiny_report(tiny):
    vec, probe = _tiny_vector(tiny), _tiny_probe(tiny)
    return vec, probe, cl.separation(tiny, vec, probe, ["fr", "zh"], limit=6, reference_limit=6)


def test_report_shape_and_english_reference_row_first(tiny, tiny_report):
    _, _, rep = tiny_report
    assert [r.language for r in rep.rows] == ["en", "fr", "zh"] and rep.layer == 2 and rep.probe_layer == 1
    assert all(r.n_harmful == r.n_harmless == 6 for r in rep.rows)
    assert set(rep.cosines) == {"en", "fr", "zh"} and rep.layers == list(range(tiny.n_layers))
    for r in rep.rows:
        assert all(0.0 <= x <= 1.0 for x in (r.direction_auroc, r.probe_auroc, r.own_auroc))
        assert r.cosine_reference == rep.cosines[r.language][rep.layer]
        assert all(-1 - 1e-9 <= c <= 1 + 1e-9 for c in rep.cosines[r.language])
    assert len(rep.table_rows()) == 3 and len(rep.table_rows()[0]) == len(cl.TABLE_HEADERS)
    assert rep.table().splitlines()[1].split()[0] == "en"
    assert rep.to_dict()["rows"][1]["language"] == "fr"


def test_negated_direction_mirrors_auroc_exactly(tiny, tiny_report):
    vec, probe, rep = tiny_report
    neg = SteeringVector(directions={k: -v for k, v in vec.directions.items()}, model=vec.model, d_model=vec.d_model,
                         n_layers=vec.n_layers, recommended_layer=vec.recommended_layer, normalized=True)
    rep2 = cl.separation(tiny, vec, probe, ["fr", "zh"], limit=6, reference_limit=6, others={"neg": neg, "same": vec})
    for a, b in zip(rep.rows, rep2.rows):
        assert b.direction_auroc == a.direction_auroc and b.probe_auroc == a.probe_auroc  # deterministic
        assert b.others["same"]["auroc"] == a.direction_auroc and b.others["same"]["layer"] == rep.layer
        assert b.others["neg"]["auroc"] == pytest.approx(1.0 - a.direction_auroc, abs=1e-12)
        assert b.others["neg"]["cosine_vector"] == pytest.approx(-a.cosine_vector, abs=1e-12)
        assert b.others["neg"]["cosine_reference"] == a.cosine_reference
    assert rep2.cosines == rep.cosines


def test_english_row_equals_the_existing_probe_and_refusal_code(tiny, tiny_report):
    from sklearn.metrics import roc_auc_score

    from steering_lab.activations import collect
    from steering_lab.datasets import instruction_split
    from steering_lab.extract import auroc as extract_auroc
    from steering_lab.refusal import candidate_means

    vec, probe, rep = tiny_report
    en = rep.row("en")
    harmful, harmless = (t[:6] for t in instruction_split("test"))
    scores = score_texts_with_probe(tiny, probe, harmful) + score_texts_with_probe(tiny, probe, harmless)
    assert en.probe_auroc == roc_auc_score([1] * 6 + [0] * 6, scores)
    unit = vec[2] / vec[2].norm()
    ph = collect(tiny, harmful, layers=[2], position="last").acts[:, 0].double() @ unit.double()
    ps = collect(tiny, harmless, layers=[2], position="last").acts[:, 0].double() @ unit.double()
    assert en.direction_auroc == extract_auroc(ph, ps)
    # the cosine curve: the refusal code's difference-in-means at the last template token
    ref_h = (instruction_split("train")[0] + instruction_split("val")[0])[:6]
    ref_s = (instruction_split("train")[1] + instruction_split("val")[1])[:6]
    ref = candidate_means(tiny, ref_h, 1)[0] - candidate_means(tiny, ref_s, 1)[0]
    own = candidate_means(tiny, harmful, 1)[0] - candidate_means(tiny, harmless, 1)[0]
    for k in range(tiny.n_layers):
        assert rep.cosines["en"][k] == pytest.approx(float(torch.cosine_similarity(own[k], ref[k], dim=0)), abs=1e-5)
    assert en.cosine_vector == pytest.approx(float(torch.cosine_similarity(own[2], vec[2], dim=0)), abs=1e-5)


def test_probe_with_another_pooling_reads_its_own_activations(tiny):
    from sklearn.metrics import roc_auc_score

    probe = _tiny_probe(tiny, layer=3, pooling="mean")
    rep = cl.separation(tiny, _tiny_vector(tiny), probe, ["de"], limit=4, reference_limit=2)
    harmful, harmless = (t[:4] for t in cl.load_language("de"))
    scores = score_texts_with_probe(tiny, probe, harmful) + score_texts_with_probe(tiny, probe, harmless)
    assert rep.row("de").probe_auroc == roc_auc_score([1] * 4 + [0] * 4, scores)
    assert rep.row("en").probe_auroc is not None


def test_separation_bad_input(tiny):
    vec = _tiny_vector(tiny)
    with pytest.raises(UserError, match="unknown language"):
        cl.separation(tiny, vec, None, ["fr", "xx"])
    with pytest.raises(UserError, match="out of range"):
        cl.separation(tiny, vec, None, ["fr"], layer=tiny.n_layers)
    with pytest.raises(UserError, match="no recommended layer"):
        cl.separation(tiny, SteeringVector(directions=dict(vec.directions)), None, ["fr"])
    with pytest.raises(UserError, match="limit"):
        cl.separation(tiny, vec, None, ["fr"], limit=1)
    with pytest.raises(UserError):  # a probe for another width
        cl.separation(tiny, vec, _tiny_probe(tiny).__class__(
            layer=0, pooling="last", weight=torch.ones(8), mean=torch.zeros(8), scale=torch.ones(8),
            bias=torch.zeros(1)), ["fr"])
    with pytest.raises(UserError, match="both classes"):
        cl.auroc([], [1.0])


def test_interventions_strength_zero_is_no_steering_and_a_baseline_is_reused(tiny, tiny_report):
    vec, probe, _ = tiny_report
    rep = cl.separation(tiny, vec, None, ["zh"], limit=2, reference_limit=2)
    cl.intervene(tiny, vec, rep, strength=0.0, limit=2, max_new_tokens=3, batch_rows=5)
    for r in rep.rows:
        assert set(r.refusal) == set(cl.INTERVENTION_KEYS)
        assert r.examples["harmless_add"] == r.examples["harmless_base"]
        assert r.refusal["harmless_add"] == r.refusal["harmless_base"]
        assert all(0.0 <= v <= 1.0 for v in r.refusal.values())
    assert rep.interventions["strength"] == 0.0 and rep.interventions["layer"] == 2
    base = {"settings": {"limit": 2, "max_new_tokens": 3},
            "languages": {r.language: {"refusal": dict(r.refusal), "examples": dict(r.examples)} for r in rep.rows}}
    base["languages"]["zh"]["examples"]["harmful_base"] = "marker"
    again = cl.refusal_interventions(tiny, vec, ["zh"], strength=0.0, limit=2, max_new_tokens=3, baseline=base)
    zh = again["languages"]["zh"]
    assert zh["examples"]["harmful_base"] == "marker"  # reused, not generated again
    assert zh["examples"]["harmful_ablate"] == rep.row("zh").examples["harmful_ablate"]
    assert zh["examples"]["harmless_add"] == rep.row("zh").examples["harmless_add"]
    with pytest.raises(UserError, match="baseline"):
        cl.refusal_interventions(tiny, vec, ["zh"], limit=3, max_new_tokens=3, baseline=base)
    with pytest.raises(UserError, match="max_new_tokens"):
        cl.intervene(tiny, vec, rep, max_new_tokens=0)
    with pytest.raises(UserError, match="strength"):
        cl.intervene(tiny, vec, rep, strength=math.inf)


def test_app_callback_and_figure(tiny):
    from steering_lab.ui import method_crosslingual as ui

    assert ui.WHERE == "extract" and ui.TITLE == "Cross-lingual refusal"
    rows, fig, summary = ui.run_check(tiny, _tiny_vector(tiny), _tiny_probe(tiny), ["es"], 4, vector_name="v")
    assert [r[0] for r in rows] == ["en", "es"] and summary["layer"] == 2
    names = [t.name for t in fig.data]
    assert "English direction" in names and "cos en" in names and "cos es" in names


def test_app_tab_builds_and_its_button_runs_on_library_names(tiny, tmp_path):
    import gradio as gr

    from steering_lab.ui import method_crosslingual as ui
    from steering_lab.ui.context import make_context

    shipped = tmp_path / "shipped"
    _tiny_vector(tiny).save(shipped / "vectors" / "rnd")
    _tiny_probe(tiny).save(shipped / "probes" / "rndprobe")
    ctx = make_context(tiny, user_dir=tmp_path / "user", shipped_root=shipped)
    with gr.Blocks():
        ui.build(ctx, {})
    rows, _, summary = ui.run_from_library(ctx, "rnd", "rndprobe", ["ru"], 3)
    assert [r[0] for r in rows] == ["en", "ru"] and rows[0][2] == 3 and summary["probe_layer"] == 1
    rows, _, summary = ui.run_from_library(ctx, "rnd", ui.NO_PROBE, ["ru"], 3)
    assert summary["probe"] is None and rows[1][5] is None
    with pytest.raises(UserError, match="language"):
        ui.run_from_library(ctx, "rnd", ui.NO_PROBE, [], 3)


def test_cli_rejects_bad_input_before_loading_a_model(capsys):
    from steering_lab.cli import main

    assert main(["crosslingual", "--languages", "fr,xx"]) == 2
    assert "unknown language" in capsys.readouterr().err
    assert main(["crosslingual", "--limit", "1"]) == 2


def test_cli_runs_on_a_local_model_and_prints_json(tiny, tiny_dir, tmp_path, capsys):
    import json

    from steering_lab.cli import main

    _tiny_vector(tiny).save(tmp_path / "v")
    argv = ["crosslingual", "--model", str(tiny_dir), "--vector", str(tmp_path / "v"), "--probe", "none",
            "--languages", "zh", "--limit", "2", "--reference-limit", "2"]
    assert main([*argv, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [r["language"] for r in rep["rows"]] == ["en", "zh"] and rep["probe"] is None and rep["layer"] == 2
    assert main([*argv, "--interventions", "--max-new-tokens", "2", "--strength", "0"]) == 0
    out = capsys.readouterr().out
    assert "auroc_dir" in out and "interventions: add strength 0.0 at layer 2" in out


# ---- the embedded model (a few seconds) ---------------------------------------------------------------

@pytest.mark.real
def test_real_model_english_row_and_french_probe(smol):
    from sklearn.metrics import roc_auc_score

    from steering_lab import resources

    vec = SteeringVector.load(resources.resolve("vectors", "harmful"))
    probe = Probe.load(resources.resolve("probes", "harmful"))
    rep = cl.separation(smol, vec, probe, ["fr"], limit=6, reference_limit=6)
    en = rep.row("en")
    from steering_lab.datasets import instruction_split

    harmful, harmless = (t[:6] for t in instruction_split("test"))
    scores = score_texts_with_probe(smol, probe, harmful) + score_texts_with_probe(smol, probe, harmless)
    assert en.probe_auroc == roc_auc_score([1] * 6 + [0] * 6, scores)
    assert rep.layer == vec.recommended_layer and rep.probe_layer == probe.layer
    # the shipped probe separates held-out English prompts (its recorded test AUROC is ~0.99)
    assert en.probe_auroc >= 0.75
