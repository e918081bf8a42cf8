"""Contrast sets: bundled presets (written for this project) and loaders for user files.

A contrast set is two lists of texts, ``positive`` and ``negative``. With ``prompts`` set, the
texts are *responses* to those prompts (pair ``i`` shares ``prompts[i]``) and activations are
taken over the response tokens; without, the texts are themselves the prompts.

User files: jsonl (``positive``/``negative`` fields, optional ``prompt``), two plain text files
(one example per line), or CSV with ``positive``,``negative`` (optional ``prompt``) columns.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import UserError, check

MAX_FILE_BYTES = 50 * 1024 * 1024


@dataclass
class ContrastSet:
    name: str
    positive: list[str]
    negative: list[str]
    prompts: list[str] | None = None
    description: str = ""
    labels: tuple[str, str] = ("positive", "negative")
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(len(self.positive) > 0, f"contrast set {self.name!r} has no positive examples")
        check(len(self.negative) > 0, f"contrast set {self.name!r} has no negative examples")
        for side, texts in (("positive", self.positive), ("negative", self.negative)):
            for i, t in enumerate(texts):
                check(isinstance(t, str) and t.strip() != "",
                      f"contrast set {self.name!r}: {side} example {i + 1} is empty or not text")
        if self.prompts is not None:
            check(len(self.prompts) == len(self.positive) == len(self.negative),
                  f"contrast set {self.name!r}: prompts, positive and negative must have equal lengths "
                  f"({len(self.prompts)}, {len(self.positive)}, {len(self.negative)})")

    @property
    def paired(self) -> bool:
        return len(self.positive) == len(self.negative)

    @property
    def default_position(self) -> str:
        return "response_mean" if self.prompts is not None else "last"

    def split(self, holdout: float, seed: int = 0) -> tuple[list[int], list[int], list[int], list[int]]:
        """Train/held-out indices ``(pos_train, pos_test, neg_train, neg_test)``; pairs stay together."""
        import random

        rng = random.Random(seed)

        def cut(n: int) -> tuple[list[int], list[int]]:
            idx = list(range(n))
            rng.shuffle(idx)
            k = max(1, round(n * holdout)) if n >= 4 else 0
            return sorted(idx[k:]), sorted(idx[:k])

        if self.paired:
            train, test = cut(len(self.positive))
            return train, test, list(train), list(test)
        pt, ph = cut(len(self.positive))
        nt, nh = cut(len(self.negative))
        return pt, ph, nt, nh


def _data_text(name: str) -> str:
    return resources.files("steering_lab.data").joinpath(name).read_text(encoding="utf-8")


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _jsonl_rows(text: str, where: str) -> list[dict]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where} line {n}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise UserError(f"{where} line {n}: JSON nested too deeply") from None
        check(isinstance(row, dict), f"{where} line {n}: expected a JSON object")
        rows.append(row)
    check(bool(rows), f"{where} holds no examples")
    return rows


def _from_rows(rows: list[dict], name: str, where: str) -> ContrastSet:
    check(isinstance(rows, list), f"{where}: expected a list of objects with 'positive' and 'negative'")
    for n, r in enumerate(rows, 1):
        check(isinstance(r, dict), f"{where} row {n}: expected an object with 'positive' and 'negative'")
    has_prompt = [("prompt" in r and str(r["prompt"]).strip() != "") for r in rows]
    check(all(has_prompt) or not any(has_prompt),
          f"{where}: either every row has a 'prompt' or none does")
    pos, neg, prompts = [], [], []
    for n, r in enumerate(rows, 1):
        for key in ("positive", "negative"):
            check(key in r, f"{where} row {n}: missing field {key!r} (need 'positive' and 'negative')")
            check(isinstance(r[key], str) and r[key].strip() != "", f"{where} row {n}: {key!r} is empty")
        pos.append(r["positive"].strip())
        neg.append(r["negative"].strip())
        if has_prompt[0]:
            prompts.append(str(r["prompt"]).strip())
    return ContrastSet(name=name, positive=pos, negative=neg, prompts=prompts if has_prompt[0] else None)


def _shown(path: str | os.PathLike) -> str:
    """How a user file is named in messages: its file name only (an upload's full path is a host path)."""
    return Path(path).name or str(path)


def _read_user_file(path: str | os.PathLike) -> str:
    p = Path(path).expanduser()
    check(p.is_file(), f"file not found: {_shown(p)}")
    check(p.stat().st_size <= MAX_FILE_BYTES, f"{_shown(p)} is larger than {MAX_FILE_BYTES // 2**20} MiB")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{_shown(p)} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    check("\x00" not in text, f"{_shown(p)} contains NUL bytes: is it a text file?")
    return text


def load_jsonl(path: str | os.PathLike, name: str | None = None) -> ContrastSet:
    """One JSON object per line; a ``.json`` file may also hold one JSON array of such objects."""
    p = Path(path)
    text, where = _read_user_file(p), _shown(p)
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
        except RecursionError:
            raise UserError(f"{where}: JSON nested too deeply") from None
        check(bool(rows), f"{where} holds no examples")
    else:
        rows = _jsonl_rows(text, where)
    return _from_rows(rows, name or p.stem, where)


def load_csv(path: str | os.PathLike, name: str | None = None) -> ContrastSet:
    p = Path(path)
    text, where = _read_user_file(p), _shown(p)
    try:
        reader = csv.DictReader(text.splitlines())
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        check("positive" in fields and "negative" in fields,
              f"{where}: CSV needs a header with 'positive' and 'negative' columns (found {fields[:8]})")
        rows = [{k.strip().lower(): (v if isinstance(v, str) else "") for k, v in row.items() if isinstance(k, str)}
                for row in reader]
    except csv.Error as exc:
        raise UserError(f"{where}: not a valid CSV file ({exc})") from None
    rows = [r for r in rows if r.get("positive", "").strip() or r.get("negative", "").strip()]
    check(bool(rows), f"{where} holds no examples")
    for r in rows:
        if not r.get("prompt", "").strip():
            r.pop("prompt", None)
    return _from_rows(rows, name or p.stem, where)


def load_text_pair(pos_path: str | os.PathLike, neg_path: str | os.PathLike,
                   name: str | None = None) -> ContrastSet:
    pos = _lines(_read_user_file(pos_path))
    neg = _lines(_read_user_file(neg_path))
    check(bool(pos), f"{_shown(pos_path)} holds no examples (the positive side is empty)")
    check(bool(neg), f"{_shown(neg_path)} holds no examples (the negative side is empty)")
    return ContrastSet(name=name or Path(pos_path).stem, positive=pos, negative=neg)


def load_user(pos: str | os.PathLike, neg: str | os.PathLike | None = None,
              name: str | None = None) -> ContrastSet:
    """One jsonl/CSV file with both classes, or two plain text files (positive, negative)."""
    suffix = Path(pos).suffix.lower()
    if neg is None:
        if suffix in (".jsonl", ".json"):
            return load_jsonl(pos, name)
        if suffix == ".csv":
            return load_csv(pos, name)
        raise UserError(f"{_shown(pos)}: give a .jsonl or .csv file with both classes, or a positive and a "
                        "negative text file")
    return load_text_pair(pos, neg, name)


# ---- bundled sets ----------------------------------------------------------------------------

def harmful_instructions() -> list[str]:
    return _lines(_data_text("harmful.txt"))


def harmless_instructions() -> list[str]:
    return _lines(_data_text("harmless.txt"))


def neutral_prompts() -> list[str]:
    return _lines(_data_text("neutral.txt"))


def refusal_responses() -> list[str]:
    """Refusal answers written for this project (the embedded model rarely refuses by itself)."""
    return _lines(_data_text("refusals.txt"))


# One split of the instruction sets for everything that trains or selects on them (refusal
# direction, refusal-style strength, probes, CAST, controller): train / val (selection,
# calibration) / test (held out, reported). Line i of harmful.txt and harmless.txt share a topic.
# Lines 105 on ("varied") are extra training prompts in many styles (polite, terse, role-play,
# hypothetical, long, typos, "for a story", harmless lines sharing words with harmful ones); they
# are training data only, so the train/val/test lines 0-104 above stay what they always were.
SPLITS = {"train": (0, 60), "val": (60, 80), "test": (80, 105), "varied": (105, None)}


def instruction_split(split: str) -> tuple[list[str], list[str]]:
    """``(harmful, harmless)`` instructions of ``split`` (train, val, test or varied)."""
    check(split in SPLITS, f"unknown split {split!r} (choose {', '.join(SPLITS)})")
    lo, hi = SPLITS[split]
    return harmful_instructions()[lo:hi], harmless_instructions()[lo:hi]


# A differently styled held-out set (chat messages with context, emails, forum posts, indirect
# phrasings): never trained on. Its lines alternate between validation (even line numbers, for
# threshold calibration) and test (odd, reported only); line i of the two files share a topic.
STYLE2_SPLITS = ("val", "test")


def style2_split(split: str) -> tuple[list[str], list[str]]:
    """``(harmful, harmless)`` prompts of the style-2 held-out set: ``val`` or ``test`` (disjoint)."""
    check(split in STYLE2_SPLITS, f"unknown style-2 split {split!r} (choose {', '.join(STYLE2_SPLITS)})")
    start = STYLE2_SPLITS.index(split)
    harmful = _lines(_data_text("heldout/harmful_style2.txt"))
    harmless = _lines(_data_text("heldout/harmless_style2.txt"))
    return harmful[start::2], harmless[start::2]


PROMPT_SETS = {
    "harmful": harmful_instructions,
    "harmless": harmless_instructions,
    "neutral": neutral_prompts,
    "harmful-test": lambda: instruction_split("test")[0],
    "harmless-test": lambda: instruction_split("test")[1],
}


def load_prompts(name: str | None = None, path: str | os.PathLike | None = None) -> list[str]:
    """A bundled prompt set by name, or a user file (one prompt per line, or jsonl with 'prompt')."""
    check((name is None) != (path is None), "give either a prompt set name or a prompts file")
    if name is not None:
        check(name in PROMPT_SETS, f"unknown prompt set {name!r} (choose {', '.join(PROMPT_SETS)})")
        return PROMPT_SETS[name]()
    text, where = _read_user_file(path), _shown(path)
    if str(path).lower().endswith((".jsonl", ".json")):
        rows = _jsonl_rows(text, where)
        for n, r in enumerate(rows, 1):
            check(isinstance(r.get("prompt"), str) and r["prompt"].strip() != "",
                  f"{where} row {n}: missing or empty 'prompt'")
        return [r["prompt"].strip() for r in rows]
    prompts = _lines(text)
    check(bool(prompts), f"{where} holds no prompts")
    return prompts


def _preset_sentiment() -> ContrastSet:
    cs = _from_rows(_jsonl_rows(_data_text("sentiment.jsonl"), "sentiment"), "sentiment", "sentiment")
    cs.description = "cheerful vs gloomy answers to everyday questions (+ = positive sentiment)"
    return cs


def _preset_formality() -> ContrastSet:
    cs = _from_rows(_jsonl_rows(_data_text("formality.jsonl"), "formality"), "formality", "formality")
    cs.description = "formal vs casual answers to the same questions (+ = formal)"
    cs.labels = ("formal", "informal")
    return cs


def _preset_harmful() -> ContrastSet:
    return ContrastSet(name="harmful", positive=harmful_instructions(), negative=harmless_instructions(),
                       description="harmful vs topic-matched harmless instructions (+ = harmful)",
                       labels=("harmful", "harmless"))


PRESETS = {
    "sentiment": _preset_sentiment,
    "formality": _preset_formality,
    "harmful": _preset_harmful,
}


def register_preset(name: str, factory) -> None:
    """Let other modules (refusal, personas) add presets without import cycles."""
    PRESETS[name] = factory


def load_preset(name: str) -> ContrastSet:
    check(isinstance(name, str) and name in PRESETS,
          f"unknown preset {str(name)[:64]!r} (choose {', '.join(sorted(PRESETS))})")
    return PRESETS[name]()
