"""What every command group shares: the parser class, argument types, the model and contrast-set
arguments, and artifact lookup by name. Imports nothing heavy (``--help`` must not load torch)."""

from __future__ import annotations

import argparse
import math
import re

from .. import resources
from ..constants import DTYPES
from ..errors import check

PROG = "steering-lab"

# argparse reads a value that starts with "-" as an option unless it looks like one negative number
# ("-8"), so "--strengths -8,-4,4,8" or "--strength -1e3" failed with "expected one argument".
# Anything that starts like a negative number (comma lists, ranges, exponents, typos in them) is a
# value here, so the value's own type reports what is wrong with it. No option starts with "-<digit>".
NEGATIVE_VALUE = re.compile(r"^-\.?\d")


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` that takes negative numbers and lists of them as values everywhere.

    Errors are argparse's own: the usage line, one ``error:`` line, exit code 2.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_VALUE  # read by argparse's _parse_optional (3.10-3.13)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def float_list(text: str) -> list[float]:
    """``"-8,-4,4,8"`` -> ``[-8.0, -4.0, 4.0, 8.0]``."""
    parts = [x for x in text.replace(" ", "").split(",") if x != ""]
    if not parts:
        raise argparse.ArgumentTypeError("expected at least one number")
    try:
        return [finite_float(x) for x in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. -8,-4,4,8; got {text!r}") from None


def _whole_number(text: str, low: int, rule: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1, "at least 1")


def nonnegative_int(text: str) -> int:
    return _whole_number(text, 0, "0 or more")


def model_args(p: argparse.ArgumentParser, *, optional_help: str | None = None) -> None:
    p.add_argument("--model", default=None,
                   help=optional_help or "HF id, local model directory or .gguf file "
                                         "(default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: GPU if present)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="default: bfloat16 on GPU, float32 on CPU")


def load_model_from_args(args: argparse.Namespace):
    from ..model import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def contrast_args(p: argparse.ArgumentParser) -> None:
    """``(--preset NAME | --pos FILE [--neg FILE])``: where a contrast set comes from."""
    from ..datasets import PRESETS  # plain Python, no torch

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="bundled contrast set")
    src.add_argument("--pos", help="positive examples: text file (one per line), or a .jsonl/.csv with both classes")
    p.add_argument("--neg", help="negative examples: text file (one per line)")


def contrast_from_args(args: argparse.Namespace):
    from ..datasets import load_preset, load_user

    if args.preset:
        check(args.neg is None, "--neg goes with --pos, not with --preset")
        return load_preset(args.preset)
    return load_user(args.pos, args.neg)


def artifact(kind: str, spec: str) -> str:
    """A ``--vector``/``--probe``/``--controller`` value: a path, or the name of a shipped or saved one."""
    return resources.resolve(kind, spec)


def load_vector(spec: str):
    """A ``--vector`` value as a SteeringVector: our safetensors pair (path or name) or a llama.cpp
    control-vector ``.gguf``."""
    path = artifact("vectors", spec)
    if path.lower().endswith(".gguf"):
        from ..export import load_gguf

        return load_gguf(path)
    from ..vector import SteeringVector

    return SteeringVector.load(path)



class ProbeLookup:
    """Probes by name or path (shipped, saved, or a file), for effect measures read from a vector's json."""

    def get(self, name: str):
        from ..probes import Probe

        return Probe.load(artifact("probes", name))


def effect_scorer(lm, vec):
    """``(scorer, label)`` of the vector's own effect measure, or ``(None, "")`` when it has none."""
    from ..measure.effect import effect_for

    return effect_for(lm, vec, ProbeLookup())
