"""steering lab: extract, apply, measure and export activation-steering directions.

The names below are imported on first use (PEP 562), so ``import steering_lab`` and the command
line's ``--help`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "UserError": ".errors",
    "Steer": ".intervene",
    "capture": ".intervene",
    "hook_count": ".intervene",
    "steer": ".intervene",
    "LoadedModel": ".model",
    "load_model": ".model",
    "SteeringVector": ".vector",
}

__all__ = ["LoadedModel", "Steer", "SteeringVector", "UserError", "capture", "hook_count", "load_model",
           "steer", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
