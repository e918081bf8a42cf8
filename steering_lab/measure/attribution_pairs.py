"""Clean/corrupt prompt pairs and metrics for attribution patching (``measure/attribution.py``).

A pair is two token-id prompts aligned at their last token (they may differ in length) and the answer
token(s) the metric reads at the last position: ``logit_diff`` (logit[answer] - logit[wrong]) or
``logprob`` (log p(answer)); any ``metric(logits [N, V], pair) -> [N]`` works. Pairs come from texts
(:func:`make_pairs`), a jsonl file (:func:`load_pairs_file`) or a bundled contrast set
(:func:`preset_pairs`: the model is asked whether each text is positive or negative, formal or
informal, ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..datasets import ContrastSet, load_preset
from ..errors import UserError, check
from ..model import LoadedModel

MAX_PAIRS = 500
# the question put around each contrast text when pairs are built from a contrast set
QUESTION = 'Is this text {a} or {b}?\n"{text}"'
ANSWER_PREFIX = "The text is"
SYSTEM = ""  # an empty system turn: SmolLM2's template otherwise adds its default one (16 more tokens per run)


@dataclass
class Pair:
    """One clean/corrupt pair of token-id prompts; the metric reads the next-token logits at the last
    position. ``answer``/``wrong``: token ids the metrics use (``logit_diff`` = logit[answer] -
    logit[wrong]; ``logprob`` = log p(answer))."""

    clean: list[int]
    corrupt: list[int]
    answer: int
    wrong: int | None = None


Metric = Callable[[torch.Tensor, Pair], torch.Tensor]  # (last-position logits [N, V], pair) -> [N]


def logit_diff(logits: torch.Tensor, pair: Pair) -> torch.Tensor:
    """logit of the clean answer minus logit of the other answer, at the last position."""
    check(pair.wrong is not None, "metric logit_diff needs a 'wrong' answer token in every pair")
    return logits[:, pair.answer].float() - logits[:, pair.wrong].float()


def logprob(logits: torch.Tensor, pair: Pair) -> torch.Tensor:
    """log-probability of the clean answer token at the last position."""
    return torch.log_softmax(logits.float(), dim=-1)[:, pair.answer]


METRICS: dict[str, Metric] = {"logit_diff": logit_diff, "logprob": logprob}


def resolve_metric(metric: str | Metric | None, pairs: Sequence[Pair]) -> tuple[str, Metric]:
    """A metric name or callable; default ``logit_diff`` when every pair has a wrong answer, else ``logprob``."""
    if metric is None:
        metric = "logit_diff" if all(p.wrong is not None for p in pairs) else "logprob"
    if callable(metric):
        return getattr(metric, "__name__", "custom"), metric
    check(isinstance(metric, str) and metric in METRICS,
          f"unknown metric {str(metric)[:40]!r} (choose {', '.join(METRICS)} or pass a function)")
    return metric, METRICS[metric]


# ---- pairs -----------------------------------------------------------------------------------

def _first_token(lm: LoadedModel, text: str, what: str) -> int:
    ids = lm.encode(text, special=False)
    check(bool(ids), f"{what} {text!r} has no tokens")
    return int(ids[0])


def make_pairs(lm: LoadedModel, clean: Sequence[str], corrupt: Sequence[str], answers: Sequence[str] | str,
               wrongs: Sequence[str] | str | None = None, *, chat: bool = False) -> list[Pair]:
    """Pairs from texts: ``clean[i]``/``corrupt[i]`` are prompts (plain text, or user turns with ``chat``),
    ``answers``/``wrongs`` the continuation texts (one for all pairs, or one per pair; their first token
    is used)."""
    clean, corrupt = list(clean), list(corrupt)
    check(len(clean) > 0, "no pairs: give at least one clean/corrupt pair")
    check(len(clean) == len(corrupt), f"{len(clean)} clean prompts but {len(corrupt)} corrupt ones: they pair up "
                                      "one to one")
    check(len(clean) <= MAX_PAIRS, f"at most {MAX_PAIRS} pairs")

    def per_pair(x, what):
        if x is None or isinstance(x, str):
            return [x] * len(clean)
        x = list(x)
        check(len(x) == len(clean), f"{len(x)} {what} for {len(clean)} pairs")
        return x

    answers, wrongs = per_pair(answers, "answers"), per_pair(wrongs, "wrong answers")
    out = []
    for i, (c, k, a, w) in enumerate(zip(clean, corrupt, answers, wrongs), 1):
        check(isinstance(c, str) and c.strip() != "" and isinstance(k, str) and k.strip() != "",
              f"pair {i}: clean and corrupt prompts must be non-empty text")
        check(isinstance(a, str) and a != "", f"pair {i}: no answer text")
        enc = (lambda t: lm.encode_prompt(t)) if chat else (lambda t: lm.encode(t, special=True))
        ans = _first_token(lm, a, "answer")
        wrong = None if w in (None, "") else _first_token(lm, w, "wrong answer")
        check(wrong is None or wrong != ans, f"pair {i}: answer and wrong answer start with the same token")
        out.append(Pair(clean=enc(c), corrupt=enc(k), answer=ans, wrong=wrong))
    return out


def pairs_from_contrast(lm: LoadedModel, contrast: ContrastSet, n_pairs: int | None = None,
                        labels: tuple[str, str] | None = None) -> list[Pair]:
    """Clean/corrupt pairs from a paired contrast set: the model is asked (one chat turn, :data:`QUESTION`,
    the answer begun with :data:`ANSWER_PREFIX`) whether a text is ``labels[0]`` or ``labels[1]`` (the
    set's labels); clean = the positive text, corrupt = the negative one; the answer tokens are the first
    tokens of `` labels[0]`` (clean) and `` labels[1]`` (for ``logit_diff``). For sets with prompts the
    texts are the responses, shown without their prompts."""
    check(contrast.paired, f"contrast set {contrast.name!r} is not paired ({len(contrast.positive)} positive, "
                           f"{len(contrast.negative)} negative examples)")
    a, b = labels or contrast.labels
    n = len(contrast.positive) if n_pairs is None else min(int(n_pairs), len(contrast.positive))
    check(n > 0, "n_pairs must be at least 1")

    def ids(text: str) -> list[int]:
        return lm.encode_prompt(QUESTION.format(a=a, b=b, text=text), system=SYSTEM) + lm.encode(ANSWER_PREFIX,
                                                                                                   special=False)

    ans, wrong = _first_token(lm, " " + a, "label"), _first_token(lm, " " + b, "label")
    check(ans != wrong, f"labels {a!r} and {b!r} start with the same token; give other labels")
    return [Pair(clean=ids(p), corrupt=ids(q), answer=ans, wrong=wrong)
            for p, q in zip(contrast.positive[:n], contrast.negative[:n])]


def load_pairs_file(lm: LoadedModel, path: str | os.PathLike, *, chat: bool = False) -> list[Pair]:
    """A jsonl file, one object per line: ``clean``, ``corrupt``, ``answer`` (the clean continuation, e.g.
    " Paris") and optionally ``wrong`` (the corrupt one: metric logit_diff, else logprob)."""
    rows, where = _read_rows(path)
    for n, r in enumerate(rows, 1):
        for key in ("clean", "corrupt", "answer"):
            check(isinstance(r.get(key), str) and r[key] != "", f"{where} row {n}: missing or empty {key!r}")
    wrongs = [r.get("wrong") for r in rows]
    check(all(w is None for w in wrongs) or all(isinstance(w, str) and w for w in wrongs),
          f"{where}: either every row has a 'wrong' answer or none does")
    return make_pairs(lm, [r["clean"] for r in rows], [r["corrupt"] for r in rows], [r["answer"] for r in rows],
                      None if wrongs[0] is None else wrongs, chat=chat)


def _read_rows(path: str | os.PathLike) -> tuple[list[dict], str]:
    """The JSON objects of a jsonl file (one per line) and the file's name for messages."""
    from pathlib import Path

    from ..datasets import MAX_FILE_BYTES

    p = Path(path).expanduser()
    where = p.name or str(path)
    check(p.is_file(), f"file not found: {where}")
    check(p.stat().st_size <= MAX_FILE_BYTES, f"{where} is larger than {MAX_FILE_BYTES // 2**20} MiB")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise UserError(f"{where} line {n}: invalid JSON") from None
        check(isinstance(row, dict), f"{where} line {n}: expected a JSON object")
        rows.append(row)
    check(bool(rows), f"{where} holds no pairs")
    return rows, where


def preset_pairs(lm: LoadedModel, preset: str, n_pairs: int | None = None) -> list[Pair]:
    """Pairs from a bundled contrast set by name (see :func:`pairs_from_contrast`)."""
    return pairs_from_contrast(lm, load_preset(preset), n_pairs)


def check_pairs(lm: LoadedModel, pairs: Sequence[Pair]) -> None:
    check(len(pairs) > 0, "no pairs: give at least one clean/corrupt pair")
    check(len(pairs) <= MAX_PAIRS, f"at most {MAX_PAIRS} pairs")
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    for i, p in enumerate(pairs, 1):
        check(isinstance(p, Pair), f"pair {i}: expected a Pair, got {type(p).__name__}")
        check(len(p.clean) > 0 and len(p.corrupt) > 0, f"pair {i}: empty prompt")
        for ids in (p.clean, p.corrupt, [p.answer] + ([] if p.wrong is None else [p.wrong])):
            check(all(0 <= int(t) < vocab for t in ids), f"pair {i}: token id outside the vocabulary ({vocab})")
