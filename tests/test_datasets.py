import pytest

from steering_lab.datasets import (
    PRESETS,
    ContrastSet,
    harmful_instructions,
    harmless_instructions,
    load_csv,
    load_jsonl,
    load_preset,
    load_text_pair,
    load_user,
    neutral_prompts,
)
from steering_lab.errors import UserError


def test_bundled_sets_are_big_enough_and_clean():
    for name, minimum in (("sentiment", 60), ("formality", 60)):
        cs = load_preset(name)
        assert len(cs.positive) >= minimum and cs.paired and cs.prompts is not None
        assert len(set(cs.positive)) == len(cs.positive) and len(set(cs.negative)) == len(cs.negative)
        assert not set(cs.positive) & set(cs.negative)
    harmful, harmless = harmful_instructions(), harmless_instructions()
    assert len(harmful) >= 100 and len(harmless) >= 100
    assert len(set(harmful)) == len(harmful) and len(set(harmless)) == len(harmless)
    assert not set(harmful) & set(harmless)
    assert len(neutral_prompts()) >= 12
    assert {"sentiment", "formality", "harmful"} <= set(PRESETS)
    assert load_preset("harmful").labels == ("harmful", "harmless")


def test_jsonl_loader(tmp_path):
    f = tmp_path / "set.jsonl"
    f.write_text('{"positive": "yes", "negative": "no"}\n\n{"positive": "good", "negative": "bad"}\n')
    cs = load_jsonl(f)
    assert cs.positive == ["yes", "good"] and cs.negative == ["no", "bad"] and cs.prompts is None
    f.write_text('{"prompt": "q1", "positive": "a", "negative": "b"}\n')
    assert load_user(f).prompts == ["q1"]


@pytest.mark.parametrize("text, match", [
    ('{"positive": "a", "negative": "b"}\n{oops\n', "line 2: invalid JSON"),
    ('{"positive": "a"}\n', "missing field 'negative'"),
    ('{"positive": "a", "negative": ""}\n', "'negative' is empty"),
    ('{"prompt": "q", "positive": "a", "negative": "b"}\n{"positive": "a", "negative": "b"}\n', "every row"),
    ("\n\n", "no examples"),
    ('["a", "b"]\n', "JSON object"),
])
def test_jsonl_errors(tmp_path, text, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(text)
    with pytest.raises(UserError, match=match):
        load_jsonl(f)


def test_text_pair_and_csv(tmp_path):
    p, n = tmp_path / "pos.txt", tmp_path / "neg.txt"
    p.write_text("happy\n\nglad\n")
    n.write_text("sad\n")
    cs = load_text_pair(p, n)
    assert cs.positive == ["happy", "glad"] and cs.negative == ["sad"] and not cs.paired
    n.write_text("\n")
    with pytest.raises(UserError, match="no examples"):
        load_user(p, n)
    c = tmp_path / "set.csv"
    c.write_text('Positive,Negative,prompt\n"great, really",awful,How was it?\nnice,mean,Who?\n')
    cs = load_csv(c)
    assert cs.positive == ["great, really", "nice"] and cs.prompts == ["How was it?", "Who?"]
    c.write_text("good,bad\nx,y\n")
    with pytest.raises(UserError, match="header"):
        load_csv(c)
    with pytest.raises(UserError, match="not found"):
        load_user(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="give a .jsonl or .csv"):
        load_user(p)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="UTF-8"):
        load_user(tmp_path / "bin.txt", p)


def test_contrast_set_split_keeps_pairs():
    cs = ContrastSet("x", [f"p{i}" for i in range(10)], [f"n{i}" for i in range(10)])
    pt, ph, nt, nh = cs.split(0.3, seed=0)
    assert pt == nt and ph == nh and len(ph) == 3 and not set(pt) & set(ph)
    assert cs.split(0.3, seed=0) == (pt, ph, nt, nh)
    with pytest.raises(UserError, match="equal lengths"):
        ContrastSet("x", ["a"], ["b"], prompts=["q", "r"])
    with pytest.raises(UserError, match="unknown preset"):
        load_preset("nope")
