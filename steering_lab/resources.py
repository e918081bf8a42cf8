"""Where the shipped artifacts live, and how a name or a path is turned into an artifact file.

The ready library for the embedded model (vectors, probes, controllers, SAEs) is package data in
``steering_lab/shipped/<kind>/`` so a checkout and an installed wheel find it the same way. A user's
own artifacts (saved from the app) live under ``$STEERING_LAB_LIBRARY`` (default: the cache dir's
``library``). This module imports nothing heavy: the CLI uses it before torch is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import check

KINDS = ("vectors", "probes", "controllers", "saes")
# kinds stored as a folder per artifact (sae-lens format: NAME/cfg.json + weights); the rest are
# NAME.safetensors + NAME.json pairs
FOLDER_KINDS = {"saes": "cfg.json"}
SUFFIXES = (".safetensors", ".json", ".gguf")
SHIPPED = Path(__file__).resolve().parent / "shipped"


def cache_root() -> Path:
    """Per-user cache directory (``$STEERING_LAB_CACHE``, else ``$XDG_CACHE_HOME/steering_lab``)."""
    env = os.environ.get("STEERING_LAB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "steering_lab"


def shipped_root() -> Path:
    """``steering_lab/shipped``: the read-only ready library (inside the installed package)."""
    return SHIPPED


def shipped_dir(kind: str) -> Path:
    """Folder of shipped artifacts of one kind (``vectors``, ``probes``, ``controllers``, ``saes``)."""
    check(kind in KINDS, f"unknown artifact kind {kind!r} (choose {', '.join(KINDS)})")
    return SHIPPED / kind


def user_root() -> Path:
    """The user's own library: ``$STEERING_LAB_LIBRARY``, else ``<cache>/library`` (what the app saves to)."""
    env = os.environ.get("STEERING_LAB_LIBRARY")
    return Path(env).expanduser() if env else cache_root() / "library"


def user_dir(kind: str) -> Path:
    check(kind in KINDS, f"unknown artifact kind {kind!r} (choose {', '.join(KINDS)})")
    return user_root() / kind


def names(kind: str, *, user: bool = True) -> list[str]:
    """Names of the shipped (and, with ``user``, the user's) artifacts of ``kind``, sorted."""
    found: set[str] = set()
    for folder in (shipped_dir(kind), user_dir(kind) if user else None):
        if folder is not None and folder.is_dir():
            if kind in FOLDER_KINDS:
                found.update(f.parent.name for f in folder.glob(f"*/{FOLDER_KINDS[kind]}"))
            else:
                found.update(f.stem for f in folder.glob("*.safetensors"))
    return sorted(found)


def _is_name(spec: str) -> bool:
    return spec != "" and "/" not in spec and os.sep not in spec and not spec.startswith((".", "~")) and \
        not spec.endswith(SUFFIXES)


def find(kind: str, spec: str | os.PathLike) -> Path | None:
    """``spec`` as a path (with or without ``.safetensors``) if such a file exists, else a shipped
    artifact of that name, else one in the user's library; ``None`` if nothing matches.

    Returns the path without extension (``.../sentiment`` for ``sentiment.safetensors``), the form
    the loaders take.
    """
    text = os.fspath(spec)
    p = Path(text).expanduser()
    if kind in FOLDER_KINDS:
        marker = FOLDER_KINDS[kind]
        if (p / marker).is_file():
            return p
        folders = (shipped_dir(kind), user_dir(kind)) if _is_name(text) else ()
        return next((d / text for d in folders if (d / text / marker).is_file()), None)
    if p.suffix == ".gguf":  # a llama.cpp control vector: the file itself
        return p if p.is_file() else None
    base = p.with_suffix("") if p.suffix in SUFFIXES else p
    if base.with_suffix(".safetensors").is_file():
        return base
    if not _is_name(text):
        return None
    for folder in (shipped_dir(kind), user_dir(kind)):
        if (folder / f"{text}.safetensors").is_file():
            return folder / text
    return None


def resolve(kind: str, spec: str | os.PathLike) -> str:
    """Like :func:`find`, but gives ``spec`` back unchanged when nothing matches, so the loader
    reports the missing file in its own words."""
    found = find(kind, spec)
    return str(found) if found is not None else os.fspath(spec)
