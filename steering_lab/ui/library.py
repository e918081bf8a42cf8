"""The artifact libraries behind the app: shipped vectors, probes and controllers (read-only, shared)
and what visitors save (their own, invisible to others).

Modes (``$STEERING_LAB_LIBRARY_MODE``; default ``per-visitor`` when ``$SPACE_ID`` is set, i.e. on a
Hugging Face Space, else ``shared``):

- ``shared``: one saved folder (``$STEERING_LAB_LIBRARY``), the right thing for a local single-user install.
- ``per-visitor``: each visitor has a folder of their own, keyed by a random id the browser keeps
  (``gr.BrowserState``, so it survives a reload) and bound to the visitor's gradio session when the
  page loads. An API client (``gradio_client``: no browser state) gets a private space keyed by its own
  gradio session, which lives as long as that client. Anything without a session is read-only.

Every name from a user or an API client becomes a path here and nowhere else: :func:`validate_name`
plus a ``resolve()`` check that the file stays inside its folder. Saves check the name, the quota
and write under one lock (thread and file lock), so check-and-write is atomic; the pair is written
as a unit (``vector.commit_pair``). Error messages name artifacts, never host paths.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import logging
import os
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError, check
from ..vector import SteeringVector, commit_pair

ROOT = Path(__file__).resolve().parents[1] / "shipped"  # = resources.shipped_root(): vectors/, probes/, ...

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MODES = ("shared", "per-visitor")
VISITOR_ID = re.compile(r"[0-9a-f]{32}")
_SUFFIXES = (".safetensors", ".json", ".gguf")
_CURRENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("steering_lab_visitor", default=None)


def validate_name(name: Any) -> str:
    """A library name: 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit;
    no '..', no file extension. Anything else (``../x``, ``/etc``, NUL, 300 characters) is refused."""
    check(isinstance(name, str), "a name must be text")
    name = name.strip()
    shown = repr(name[:40] + ("..." if len(name) > 40 else ""))
    check(NAME.fullmatch(name) is not None and ".." not in name and not name.lower().endswith(_SUFFIXES),
          f"invalid name {shown}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit")
    return name


def _env_int(key: str, default: int | None) -> int | None:
    raw = os.environ.get(key, "").strip()
    if raw == "":
        return default
    try:
        value = int(float(raw))
    except ValueError:
        raise UserError(f"${key} must be a number, got {raw!r}") from None
    return None if value <= 0 else value


def library_mode(mode: str | None = None) -> str:
    """``shared`` or ``per-visitor`` (argument, else ``$STEERING_LAB_LIBRARY_MODE``, else by ``$SPACE_ID``)."""
    mode = mode or os.environ.get("STEERING_LAB_LIBRARY_MODE", "").strip().lower() or (
        "per-visitor" if os.environ.get("SPACE_ID") else "shared")
    mode = mode.replace("_", "-")
    check(mode in MODES, f"unknown library mode {mode!r} (choose {', '.join(MODES)})")
    return mode


@dataclass(frozen=True)
class Limits:
    """Quotas for what one visitor (or the shared folder) may store, and the largest upload.
    ``None`` means unlimited."""

    max_items: int | None = 50
    max_bytes: int | None = 64 * 2**20
    max_upload: int = 16 * 2**20

    @classmethod
    def from_env(cls, mode: str) -> Limits:
        """``$STEERING_LAB_MAX_ITEMS``, ``$STEERING_LAB_MAX_MB`` (per visitor; unlimited by default in
        shared mode, 50 and 64 in per-visitor mode; 0 = unlimited), ``$STEERING_LAB_MAX_UPLOAD_MB`` (16)."""
        per = mode == "per-visitor"
        mb = _env_int("STEERING_LAB_MAX_MB", 64 if per else None)
        return cls(max_items=_env_int("STEERING_LAB_MAX_ITEMS", 50 if per else None),
                   max_bytes=None if mb is None else mb * 2**20,
                   max_upload=(_env_int("STEERING_LAB_MAX_UPLOAD_MB", 16) or 16) * 2**20)


def _gradio_session() -> str | None:
    """The gradio session hash of the event being processed on this thread, if any."""
    try:
        from gradio.context import LocalContext
    except ImportError:
        return None
    request = LocalContext.request.get(None)
    session = getattr(request, "session_hash", None) if request is not None else None
    return session if isinstance(session, str) and session else None


class Visitors:
    """Who is asking, and where their files go."""

    def __init__(self, mode: str, root: Path, limits: Limits | None = None, max_sessions: int = 20_000) -> None:
        self.mode = library_mode(mode)
        self.root = Path(root)
        self.limits = limits or Limits.from_env(self.mode)
        self._sessions: OrderedDict[str, str] = OrderedDict()  # gradio session -> browser visitor id (LRU)
        self._max_sessions = max_sessions
        self._lock = threading.Lock()

    @property
    def per_visitor(self) -> bool:
        return self.mode == "per-visitor"

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def bind(self, session: str | None, visitor: Any) -> str:
        """Bind a gradio session to the visitor id its browser holds (a fresh id when it holds none
        or something that is not one); returns the id for the browser to keep."""
        vid = visitor if isinstance(visitor, str) and VISITOR_ID.fullmatch(visitor) else self.new_id()
        if session:
            with self._lock:
                self._sessions[session] = vid
                self._sessions.move_to_end(session)
                while len(self._sessions) > self._max_sessions:
                    self._sessions.popitem(last=False)
        return vid

    def current(self) -> str | None:
        """The visitor of this call: an explicit :meth:`visiting` scope, else the gradio session's
        bound browser id, else the gradio session itself (API clients), else None."""
        explicit = _CURRENT.get()
        if explicit:
            return explicit
        session = _gradio_session()
        if session is None:
            return None
        with self._lock:
            bound = self._sessions.get(session)
        return bound or f"session:{session}"

    def secret(self) -> str:
        """The key the browser's visitor id is encrypted with: ``$STEERING_LAB_SECRET``, else one kept in
        the library folder (so ids survive a restart), else a fresh one (ids last until the restart)."""
        env = os.environ.get("STEERING_LAB_SECRET", "").strip()
        if env:
            return env
        path = self.root / ".browser-secret"
        try:
            if path.is_file():
                text = path.read_text().strip()
                if len(text) >= 16:
                    return text
            self.root.mkdir(parents=True, exist_ok=True)
            text = uuid.uuid4().hex + uuid.uuid4().hex
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            return text
        except OSError:
            return uuid.uuid4().hex

    def folder(self, visitor: str) -> Path:
        """A visitor's folder: a digest of the id, so no id ever becomes a path."""
        return self.root / "visitors" / hashlib.sha256(visitor.encode()).hexdigest()[:32]


@contextlib.contextmanager
def visiting(visitor: str | None) -> Iterator[None]:
    """Run library calls on behalf of ``visitor`` (tests, scripts, callbacks that hold the id)."""
    token = _CURRENT.set(visitor)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def _file_lock(folder: Path) -> Iterator[None]:
    """An advisory lock on ``folder`` across processes (an app and a CLI sharing one folder)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: the thread lock still holds within this process
        yield
        return
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _os_error(exc: OSError, kind: str, name: str) -> UserError:
    """A save that the file system refused, said without host paths."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the library folder is read-only"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk holding the library is full"
    else:
        why = exc.strerror or type(exc).__name__
    return UserError(f"could not save {kind} {name!r}: {why}; nothing was changed")


class ArtifactLibrary:
    """Named ``NAME.safetensors`` + ``NAME.json`` pairs in a read-only shipped folder and a saved folder
    (``user`` in shared mode, the calling visitor's own in per-visitor mode)."""

    kind = "artifact"

    def __init__(self, shipped: Path | None, user: Path, visitors: Visitors | None = None) -> None:
        self.shipped = shipped if shipped is not None and shipped.is_dir() else None
        self.user = Path(user)
        self.visitors = visitors or Visitors("shared", self.user.parent, Limits(None, None))
        self._lock = threading.Lock()

    # ---- where --------------------------------------------------------------------------
    def user_dir(self) -> Path | None:
        """The saved folder of the current caller (None: read-only, no visitor)."""
        if not self.visitors.per_visitor:
            return self.user
        visitor = self.visitors.current()
        return None if visitor is None else self.visitors.folder(visitor) / self.user.name

    def _quota_root(self, user: Path) -> Path:
        return user.parent if self.visitors.per_visitor else user

    def _dirs(self) -> list[Path]:
        return [d for d in (self.shipped, self.user_dir()) if d is not None and d.is_dir()]

    def _file(self, folder: Path, name: str, suffix: str) -> Path:
        """``folder/name+suffix``, refused unless it resolves inside ``folder`` (links included)."""
        p = folder / f"{name}{suffix}"
        check(p.resolve().is_relative_to(folder.resolve()), f"{self.kind} {name!r} is outside the library")
        return p

    def names(self) -> list[str]:
        found = set()
        for d in self._dirs():
            for f in d.glob("*.safetensors"):
                if NAME.fullmatch(f.stem) and ".." not in f.stem:
                    found.add(f.stem)
        return sorted(found)

    def _find(self, name: str) -> Path | None:
        name = validate_name(name)
        for d in self._dirs():
            p = self._file(d, name, ".safetensors")
            if p.is_file():
                return p.with_suffix("")
        return None

    def path(self, name: str) -> Path:
        """Base path (no extension) of ``name``; shipped artifacts come first (a saved one never shadows them)."""
        found = self._find(name)
        if found is None:
            raise UserError(f"no {self.kind} called {str(name)[:64]!r} in the library")
        return found

    def is_user(self, name: str) -> bool:
        name = validate_name(name)
        user = self.user_dir()
        if user is None or not self._file(user, name, ".safetensors").is_file():
            return False
        return not (self.shipped is not None and (self.shipped / f"{name}.safetensors").is_file())

    # ---- quota --------------------------------------------------------------------------
    def usage(self) -> tuple[int, int]:
        """``(artifacts, bytes)`` saved by the current caller (all kinds in per-visitor mode)."""
        user = self.user_dir()
        if user is None:
            return 0, 0
        root = self._quota_root(user)
        if not root.is_dir():
            return 0, 0
        files = [f for f in root.rglob("*") if f.is_file() and not f.name.startswith(".")]
        return sum(f.suffix == ".safetensors" for f in files), sum(f.stat().st_size for f in files)

    def _check_quota(self, new_bytes: int, replaced: int = 0, new_item: bool = True) -> None:
        limits = self.visitors.limits
        items, used = self.usage()
        who = "your library" if self.visitors.per_visitor else "the library"
        if limits.max_items is not None and new_item:
            check(items < limits.max_items, f"{who} is full: {items} of {limits.max_items} artifacts saved; "
                                            "delete some first (the limit is $STEERING_LAB_MAX_ITEMS)")
        if limits.max_bytes is not None:
            after = used - replaced + new_bytes
            check(after <= limits.max_bytes,
                  f"{who} is full: saving this would use {_size(after)} of {_size(limits.max_bytes)}; "
                  "delete some first (the limit is $STEERING_LAB_MAX_MB)")

    # ---- writes -------------------------------------------------------------------------
    def _writable(self) -> Path:
        user = self.user_dir()
        check(user is not None, f"saving a {self.kind} needs a session: open the app in a browser, or call the "
                                "API through gradio_client (each client gets a private space)")
        return user

    def _check_free(self, user: Path, name: str, overwrite: bool) -> None:
        check(self.shipped is None or not (self.shipped / f"{name}.safetensors").is_file(),
              f"{name!r} is the name of a shipped {self.kind}; choose another")
        check(overwrite or not self._file(user, name, ".safetensors").is_file(),
              f"a {self.kind} called {name!r} exists; choose another name or delete it first")

    def target(self, name: str, overwrite: bool = False) -> Path:
        """Where a new artifact called ``name`` would go: checks the name, that it is free and that
        the quota has room (a cheap early check before a long job; :meth:`save` checks again under the lock)."""
        name = validate_name(name)
        user = self._writable()
        self._check_free(user, name, overwrite)
        self._check_quota(0, new_item=not self._file(user, name, ".safetensors").is_file())
        return user / name

    def save(self, obj: Any, name: str, overwrite: bool = False) -> str:
        """Commit ``obj`` (anything with ``encode() -> (safetensors bytes, json bytes)``: a vector,
        probe or controller) as ``name``: name, room and write checked under one lock."""
        name = validate_name(name)
        st, js = obj.encode()
        user = self._writable()
        try:
            user.mkdir(parents=True, exist_ok=True)
            with self._lock, _file_lock(user):
                self._check_free(user, name, overwrite)
                old = [self._file(user, name, s) for s in (".safetensors", ".json")]
                replaced = sum(p.stat().st_size for p in old if p.is_file())
                self._check_quota(len(st) + len(js), replaced, new_item=not old[0].is_file())
                commit_pair(user / name, st, js)
        except OSError as exc:
            raise _os_error(exc, self.kind, name) from None
        return name

    def delete(self, name: str) -> None:
        name = validate_name(name)
        check(self.is_user(name), f"{name!r} is a shipped {self.kind} or not one of yours, and cannot be deleted")
        user = self._writable()
        try:
            with self._lock, _file_lock(user):
                # tensors first: a pair without its tensors file is no longer listed
                for suffix in _SUFFIXES:
                    self._file(user, name, suffix).unlink(missing_ok=True)
        except OSError as exc:
            why = "the library folder is read-only" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) \
                else (exc.strerror or type(exc).__name__)
            raise UserError(f"could not delete {self.kind} {name!r}: {why}") from None

    def _check_upload(self, path: str | os.PathLike, suffixes: tuple[str, ...], what: str) -> Path:
        src = Path(path)
        check(src.suffix.lower() in suffixes,
              f"{what} must be {' or '.join(suffixes)} (pickled formats such as .pt, .bin, .pkl are never loaded)")
        check(src.is_file(), f"the uploaded {what} is missing; upload it again")
        size, limit = src.stat().st_size, self.visitors.limits.max_upload
        check(size <= limit, f"the uploaded {what} is {_size(size)}; the limit is {_size(limit)} "
                             "($STEERING_LAB_MAX_UPLOAD_MB)")
        return src


class VectorLibrary(ArtifactLibrary):
    kind = "vector"

    def __init__(self, shipped: Path | None, user: Path, visitors: Visitors | None = None) -> None:
        super().__init__(shipped, user, visitors)
        self._cache: dict[Path, tuple[tuple[int, int], SteeringVector]] = {}

    def get(self, name: str) -> SteeringVector:
        base = self.path(name)
        st = base.with_suffix(".safetensors").stat()
        stamp = (st.st_mtime_ns, st.st_size)
        hit = self._cache.get(base)
        if hit is None or hit[0] != stamp:
            hit = (stamp, SteeringVector.load(base, label=f"vector {name!r}"))
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[base] = hit
        return hit[1]

    def import_files(self, safetensors: str | os.PathLike, json_file: str | os.PathLike | None, name: str,
                     lm: Any) -> str:
        """Validate an uploaded vector (safetensors only, never pickle) against the model, then store
        a fresh copy written by us; the uploaded files are read in place and never copied."""
        name = validate_name(name)
        self.target(name)  # name free, room left: before reading anything
        src = self._check_upload(safetensors, (".safetensors",), "the vector file")
        js = None if not json_file else self._check_upload(json_file, (".json",), "the metadata file")
        vec = SteeringVector.load_files(src, js, lm, label=f"uploaded vector {name!r}")
        return self.save(vec, name)

    def table(self) -> list[list[Any]]:
        rows = []
        for name in self.names():
            try:
                v = self.get(name)
            except UserError as exc:
                rows.append([name, "error", "", "", "", "", str(exc), "", ""])
                continue
            rows.append([name, "user" if self.is_user(name) else "shipped", v.recommended_layer,
                         v.recommended_strength, v.method, v.description, v.extra.get("effect", ""),
                         _measure_text(v), _calibration_text(v)])
        return rows


def _measure_text(v: SteeringVector) -> str:
    from ..measure.effect import measure_of

    try:
        m = measure_of(v)
    except UserError as exc:
        return f"invalid: {exc}"
    return m.label if m is not None else "none (refusal only)"


def _calibration_text(v: SteeringVector) -> str:
    """How the recommended layer/strength was found: a calibration (with its split) or the constant rule."""
    cal = v.extra.get("calibration")
    if not isinstance(cal, dict) or not isinstance(cal.get("chosen"), dict):
        return "constant rule (not calibrated)"
    c, test = cal["chosen"], cal.get("test", {}).get("calibrated", {})
    lo, hi = (cal.get("fluent_range") or [None, None])[:2]
    text = f"calibrated on val: layer {c.get('layer')}, strength {c.get('strength'):g}"
    if lo is not None:
        text += f"; fluent {lo:g}..{hi:g}"
    if test:
        text += f"; test effect {test.get('effect', float('nan')):.2f} at KL {test.get('kl', float('nan')):.2f}"
    return text


class ProbeLibrary(ArtifactLibrary):
    kind = "probe"

    def get(self, name: str):
        from ..probes import Probe

        return Probe.load(self.path(name), label=f"probe {name!r}")


class ControllerLibrary(ArtifactLibrary):
    kind = "controller"

    def get(self, name: str):
        from ..controller import Controller

        return Controller.load(self.path(name), label=f"controller {name!r}")


def make_libraries(shipped_root: Path, user_base: Path, mode: str | None = None,
                   limits: Limits | None = None) -> tuple[VectorLibrary, ProbeLibrary, ControllerLibrary]:
    """The three libraries sharing one :class:`Visitors` (reach it as ``.visitors`` on any of them)."""
    visitors = Visitors(library_mode(mode), user_base, limits)
    return (VectorLibrary(shipped_root / "vectors", user_base / "vectors", visitors),
            ProbeLibrary(shipped_root / "probes", user_base / "probes", visitors),
            ControllerLibrary(shipped_root / "controllers", user_base / "controllers", visitors))
