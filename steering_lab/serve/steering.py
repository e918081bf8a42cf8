"""Steering given by a remote caller: a list of ``{vector, strength, layer?, operator?}`` items or a
model name such as ``smollm2+sentiment@-20+formality@5:9``, resolved against the app's library.

Vector names go through the library's one name check (``validate_name``) and lookup
(``ctx.vectors.get``); they never become paths here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UserError, check
from ..intervene import OPERATORS, Steer
from ..ui.library import validate_name

MAX_ITEMS = 8
MAX_ABS_STRENGTH = 1e4


@dataclass
class SteerSpec:
    """One resolved steering item (what the caller asked for, with the defaults filled in)."""

    vector: str
    strength: float
    layers: list[int]
    operator: str

    def to_dict(self) -> dict:
        return {"vector": self.vector, "strength": self.strength, "layers": self.layers, "operator": self.operator}


def model_id(lm) -> str:
    """The id the endpoint serves the loaded model under: its name, lower case, ``/`` kept."""
    return re.sub(r"[^a-z0-9._/-]+", "-", lm.name.lower()).strip("-") or "model"


def model_aliases(lm) -> set[str]:
    """Base names a request may use: the id, the loaded name, its last path part and that part up to
    the first ``-`` (``smollm2`` for ``SmolLM2-135M-Instruct``)."""
    ident = model_id(lm)
    base = ident.rsplit("/", 1)[-1]
    return {ident, lm.name.lower(), base, base.split("-", 1)[0]}


_ITEM = re.compile(r"^(?P<name>[^@:]+)(?:@(?P<strength>[^:]+))?(?::(?P<layer>.+))?$")


def parse_model_name(name: str, lm) -> tuple[str, list[dict]]:
    """``BASE(+VECTOR[@STRENGTH][:LAYER])*`` -> (base, steering items). Without ``@STRENGTH`` a vector
    steers at its recommended strength, without ``:LAYER`` at its recommended layer."""
    check(isinstance(name, str) and name.strip() != "", "'model' must be a non-empty string")
    base, *parts = name.strip().split("+")
    if base.lower() not in model_aliases(lm):
        raise ModelNotFound(f"model {base!r} is not served here; use {model_id(lm)!r} "
                            f"(optionally with +VECTOR@STRENGTH, e.g. {model_id(lm)}+sentiment@-20)")
    items = []
    for part in parts:
        m = _ITEM.match(part.strip())
        check(m is not None, f"bad steering part {part!r} in the model name: use +VECTOR@STRENGTH or "
                             "+VECTOR@STRENGTH:LAYER")
        item: dict[str, Any] = {"vector": m["name"]}
        if m["strength"] is not None:
            item["strength"] = _number(m["strength"], f"strength of {m['name']!r} in the model name")
        if m["layer"] is not None:
            item["layer"] = m["layer"]
        items.append(item)
    return base, items


class ModelNotFound(UserError):
    """The base model named in a request is not the one served."""


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise UserError(f"{what} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number, got {value!r}") from None
    check(math.isfinite(out), f"{what} must be a finite number, got {value!r}")
    check(abs(out) <= MAX_ABS_STRENGTH, f"{what} must be within ±{MAX_ABS_STRENGTH:g}, got {value!r}")
    return out


def _layer(value: Any, n_layers: int, what: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        value = int(value.strip())
    check(isinstance(value, int) and not isinstance(value, bool),
          f"{what} must be an integer block index, got {value!r}")
    check(0 <= value < n_layers, f"{what} {value} is out of range: the model has {n_layers} blocks (0-{n_layers - 1})")
    return value


def resolve(ctx, items: Sequence[Any]) -> tuple[list[Steer], list[SteerSpec]]:
    """Check the items against the library and the model; return the interventions and their specs."""
    check(isinstance(items, (list, tuple)), "'steering' must be a list of {vector, strength, layer?, operator?}")
    check(len(items) <= MAX_ITEMS, f"at most {MAX_ITEMS} steering items per request")
    steers, specs = [], []
    for i, item in enumerate(items):
        where = f"steering[{i}]"
        check(isinstance(item, dict), f"{where} must be an object with 'vector' and 'strength'")
        unknown = set(item) - {"vector", "strength", "layer", "operator"}
        check(not unknown, f"{where} has unknown field(s) {sorted(unknown)} (allowed: vector, strength, layer, "
                           "operator)")
        check(isinstance(item.get("vector"), str), f"{where}.vector must be a vector name")
        name = validate_name(item["vector"])
        vec = ctx.vectors.get(name)  # UserError "no vector called ..." for unknown names
        vec.check_model(ctx.lm)
        operator = item.get("operator", "add")
        check(operator in OPERATORS, f"{where}.operator must be one of {', '.join(OPERATORS)}, got {operator!r}")
        if item.get("strength") is None:
            check(operator in ("add", "transport") and vec.recommended_strength is not None,
                  f"{where}: give a strength (the vector has no recommended strength for {operator!r})")
            strength = float(vec.recommended_strength)
        else:
            strength = _number(item["strength"], f"{where}.strength")
        if operator == "ablate":
            check(0.0 <= strength <= 1.0, f"{where}.strength for ablate must be in [0, 1], got {strength:g}")
        if operator == "rotate":
            check(-180.0 <= strength <= 180.0, f"{where}.strength for rotate is an angle in degrees (-180..180)")
        if operator == "transport":
            check(0.0 <= strength <= 1.0, f"{where}.strength for transport is lambda in [0, 1], got {strength:g}")
        if item.get("layer") is None:
            layers = vec.default_layers()
        else:
            layers = [_layer(item["layer"], ctx.lm.n_layers, f"{where}.layer")]
            check(layers[0] in vec.layers, f"{where}.layer {layers[0]} is not among vector {name!r}'s layers "
                                           f"({_span(vec.layers)})")
        vec.check_model(ctx.lm, layers)
        steers.append(Steer(vec, strength, layers=layers, operator=operator))
        specs.append(SteerSpec(vector=name, strength=strength, layers=list(layers), operator=operator))
    return steers, specs


def _span(layers: Sequence[int]) -> str:
    layers = sorted(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))
