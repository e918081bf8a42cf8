"""The vector library behind the app: shipped vectors (read-only) and the user's saved ones."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path
from typing import Any

from ..errors import UserError, check
from ..vector import SteeringVector

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ROOT = Path(__file__).resolve().parents[1] / "shipped"  # = resources.shipped_root(): vectors/, probes/, ...


def validate_name(name: str) -> str:
    name = (name or "").strip()
    check(bool(NAME.match(name)) and not name.endswith((".safetensors", ".json", ".gguf")) and ".." not in name,
          f"invalid name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit")
    return name


class ArtifactLibrary:
    """Named ``NAME.safetensors`` + ``NAME.json`` files in a read-only shipped folder and a user folder."""

    def __init__(self, shipped: Path | None, user: Path) -> None:
        self.shipped = shipped if shipped is not None and shipped.is_dir() else None
        self.user = user
        self._lock = threading.Lock()

    def _dirs(self) -> list[Path]:
        return [d for d in (self.shipped, self.user) if d is not None and d.is_dir()]

    def names(self) -> list[str]:
        found = {}
        for d in self._dirs():
            for f in sorted(d.glob("*.safetensors")):
                found.setdefault(f.stem, f)
        return sorted(found)

    def path(self, name: str) -> Path:
        for d in self._dirs():
            p = d / f"{name}.safetensors"
            if p.is_file():
                return p.with_suffix("")
        raise UserError(f"no {self.kind} called {name!r} in the library")

    def is_user(self, name: str) -> bool:
        return (self.user / f"{name}.safetensors").is_file() and not (
            self.shipped is not None and (self.shipped / f"{name}.safetensors").is_file())

    def delete(self, name: str) -> None:
        name = validate_name(name)
        check(self.is_user(name), f"{name!r} is a shipped {self.kind} and cannot be deleted")
        with self._lock:
            for suffix in (".safetensors", ".json", ".gguf"):
                (self.user / f"{name}{suffix}").unlink(missing_ok=True)

    def target(self, name: str, overwrite: bool = False) -> Path:
        """Where a new user artifact called ``name`` goes (checked not to shadow a shipped one)."""
        name = validate_name(name)
        check(self.shipped is None or not (self.shipped / f"{name}.safetensors").is_file(),
              f"{name!r} is the name of a shipped {self.kind}; choose another")
        check(overwrite or not (self.user / f"{name}.safetensors").is_file(),
              f"a {self.kind} called {name!r} exists; choose another name or delete it first")
        self.user.mkdir(parents=True, exist_ok=True)
        return self.user / name

    kind = "artifact"


class VectorLibrary(ArtifactLibrary):
    kind = "vector"

    def __init__(self, shipped: Path | None, user: Path) -> None:
        super().__init__(shipped, user)
        self._cache: dict[str, tuple[float, SteeringVector]] = {}

    def get(self, name: str) -> SteeringVector:
        base = self.path(name)
        mtime = base.with_suffix(".safetensors").stat().st_mtime
        hit = self._cache.get(name)
        if hit is None or hit[0] != mtime:
            hit = (mtime, SteeringVector.load(base))
            self._cache[name] = hit
        return hit[1]

    def save(self, vec: SteeringVector, name: str, overwrite: bool = False) -> str:
        target = self.target(name, overwrite)
        with self._lock:
            vec.save(target)
        return target.name

    def import_files(self, safetensors: str | Path, json_file: str | Path | None, name: str, lm: Any) -> str:
        """Validate an uploaded vector (safetensors only, never pickle) against the model and store it."""
        src = Path(safetensors)
        check(src.suffix == ".safetensors", "upload a .safetensors file (pickled formats are never loaded)")
        target = self.target(name)
        tmp = target.with_name(f".upload-{target.name}")
        try:
            shutil.copyfile(src, tmp.with_suffix(".safetensors"))
            if json_file:
                check(Path(json_file).suffix == ".json", "the metadata file must be .json")
                shutil.copyfile(json_file, tmp.with_suffix(".json"))
            vec = SteeringVector.load(tmp, lm)  # raises a clear error on anything that does not fit
        finally:
            for suffix in (".safetensors", ".json"):
                tmp.with_suffix(suffix).unlink(missing_ok=True)
        return self.save(vec, target.name)

    def table(self) -> list[list[Any]]:
        rows = []
        for name in self.names():
            try:
                v = self.get(name)
            except UserError as exc:
                rows.append([name, "error", "", "", "", "", str(exc)])
                continue
            rows.append([name, "user" if self.is_user(name) else "shipped", v.recommended_layer,
                         v.recommended_strength, v.method, v.description, v.extra.get("effect", "")])
        return rows


class ProbeLibrary(ArtifactLibrary):
    kind = "probe"

    def get(self, name: str):
        from ..probes import Probe

        return Probe.load(self.path(name))


class ControllerLibrary(ArtifactLibrary):
    kind = "controller"

    def get(self, name: str):
        from ..controller import Controller

        return Controller.load(self.path(name))
