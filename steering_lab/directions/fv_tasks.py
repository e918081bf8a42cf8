"""Tasks for function vectors: ``(input, output)`` pairs (``steering_lab/data/fv_tasks/NAME.jsonl``), seeded
disjoint train / valid / test splits, N-shot in-context prompts (``"hot: cold\nbig: small\nfast:"``, labels
optionally shuffled), and the answer's first token. Used by :mod:`.function_vectors`."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, check
from ..model import LoadedModel

TASK_DIR = Path(__file__).resolve().parents[1] / "data" / "fv_tasks"
SPLITS = ("train", "valid", "test")
_NAME = re.compile(r"[A-Za-z0-9_]+")

Pair = tuple[str, str]


# ---- tasks ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    name: str
    pairs: tuple[Pair, ...]


def task_names() -> list[str]:
    """Names of the shipped tasks (``steering_lab/data/fv_tasks/NAME.jsonl``)."""
    return sorted(p.stem for p in TASK_DIR.glob("*.jsonl"))


def read_pairs(path: str | Path) -> list[Pair]:
    """``(input, output)`` pairs of a jsonl file with ``{"input": ..., "output": ...}`` per line; the first
    pair of a repeated input is kept."""
    path = Path(path)
    check(path.is_file(), f"no task file {str(path)!r}")
    pairs: list[Pair] = []
    seen: set[str] = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path.name} line {n}: not JSON ({e.msg})") from None
        check(isinstance(row, dict) and isinstance(row.get("input"), str) and isinstance(row.get("output"), str),
              f"{path.name} line {n}: expected {{\"input\": TEXT, \"output\": TEXT}}")
        x, y = row["input"].strip(), row["output"].strip()
        check(bool(x) and bool(y), f"{path.name} line {n}: empty input or output")
        check("\n" not in x + y and ":" not in x, f"{path.name} line {n}: an input may not hold ':' or a newline")
        if x not in seen:
            seen.add(x)
            pairs.append((x, y))
    return pairs


def load_task(task: str | Path | Task | Sequence[Pair]) -> Task:
    """A shipped task by name, a jsonl path, a :class:`Task`, or a list of pairs."""
    if isinstance(task, Task):
        out = task
    elif isinstance(task, (list, tuple)):
        out = Task("custom", tuple((str(x), str(y)) for x, y in task))
    else:
        text = str(task)
        if text.endswith(".jsonl") or "/" in text:
            out = Task(Path(text).stem, tuple(read_pairs(text)))
        else:
            names = task_names()
            check(bool(_NAME.fullmatch(text)) and text in names,
                  f"unknown task {text!r} (choose {', '.join(names)}, or give a .jsonl path)")
            out = Task(text, tuple(read_pairs(TASK_DIR / f"{text}.jsonl")))
    check(len(out.pairs) > 0, f"task {out.name!r} has no pairs")
    return out


@dataclass(frozen=True)
class Splits:
    train: tuple[Pair, ...]
    valid: tuple[Pair, ...]
    test: tuple[Pair, ...]

    def get(self, name: str) -> tuple[Pair, ...]:
        check(name in SPLITS, f"unknown split {name!r} (choose {', '.join(SPLITS)})")
        return getattr(self, name)


def split_task(task: Task, seed: int = 0, fractions: tuple[float, float] = (0.4, 0.2)) -> Splits:
    """Seeded disjoint ``train`` / ``valid`` / ``test`` splits of the pairs (rest after train and valid is test)."""
    check(0 < fractions[0] and 0 < fractions[1] and sum(fractions) < 1, f"bad split fractions {fractions}")
    check(len(task.pairs) >= 6, f"task {task.name!r} has {len(task.pairs)} pairs; need at least 6 to split")
    pairs = list(task.pairs)
    random.Random(seed).shuffle(pairs)
    n_train = max(2, int(round(fractions[0] * len(pairs))))
    n_valid = max(2, int(round(fractions[1] * len(pairs))))
    return Splits(tuple(pairs[:n_train]), tuple(pairs[n_train:n_train + n_valid]), tuple(pairs[n_train + n_valid:]))


# ---- prompts -------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    text: str
    query: str
    answer: str


def icl_text(demos: Sequence[Pair], query: str) -> str:
    """``"x1: y1\\nx2: y2\\n...\\nquery:"``."""
    return "".join(f"{x}: {y}\n" for x, y in demos) + f"{query}:"


def build_prompts(pairs: Sequence[Pair], n: int, shots: int, *, seed: int = 0, shuffle_labels: bool = False,
                  queries: Sequence[Pair] | None = None) -> list[Prompt]:
    """``n`` prompts of ``shots`` demonstrations each, all drawn from ``pairs`` (seeded).

    Queries come from ``queries`` in order (each once, ``n`` ignored) or are drawn from ``pairs``;
    a query is never one of its own demonstrations. ``shuffle_labels`` permutes the demonstration
    outputs among the demonstrations (the corrupted prompts of the paper); the answer stays correct.
    """
    check(shots >= 0, "shots must be 0 or more")
    rng = random.Random(seed)
    label_rng = random.Random(seed * 7919 + 1)  # apart: the same seed gives the same prompts, labels shuffled or not
    pool = list(pairs)
    if queries is None:
        check(n >= 1, "need at least one prompt")
        check(len(pool) >= shots + 1, f"{len(pool)} pairs cannot make {shots}-shot prompts (need {shots + 1}: "
                                      f"the demonstrations plus a query)")
        chosen = [pool[rng.randrange(len(pool))] for _ in range(n)]
    else:
        chosen = list(queries)
        check(len(chosen) > 0, "no queries")
    out = []
    for q in chosen:
        others = [p for p in pool if p[0] != q[0]]
        check(len(others) >= shots, f"{len(pool)} demonstration pairs cannot make {shots}-shot prompts")
        demos = rng.sample(others, shots) if shots else []
        if shuffle_labels and shots > 1:
            labels = [y for _, y in demos]
            label_rng.shuffle(labels)
            demos = [(x, y) for (x, _), y in zip(demos, labels)]
        out.append(Prompt(icl_text(demos, q[0]), q[0], q[1]))
    return out


def answer_token(lm: LoadedModel, answer: str) -> int:
    """The first token of ``" " + answer`` (what follows ``"query:"``)."""
    ids = lm.encode(" " + answer, special=False)
    check(len(ids) > 0, f"answer {answer!r} has no tokens")
    return ids[0]


def token_problems(lm: LoadedModel, pairs: Sequence[Pair]) -> list[str]:
    """Pairs whose answer's first token does not identify it: equal to the input's first token (a copy
    would score) or shared with another answer of the task."""
    seen: dict[int, str] = {}
    problems = []
    for x, y in pairs:
        t = answer_token(lm, y)
        if t == answer_token(lm, x):
            problems.append(f"{x!r} -> {y!r}: the answer starts with the input's first token")
        elif t in seen:
            problems.append(f"{x!r} -> {y!r}: first token shared with {seen[t]!r}")
        seen.setdefault(t, y)
    return problems
