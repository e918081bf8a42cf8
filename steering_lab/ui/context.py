"""What the app shares: the model (read-only), the libraries, and per-session run ids.

Steering state never lives here: each event builds its own request (its interventions, from its
inputs) and the model's decode engine batches concurrent visitors' requests, each row with its own
steering. Generation events therefore run concurrently (``GENERATE_QUEUE``); jobs that train or
extract run one at a time (``MODEL_QUEUE``). A session's new run, Stop, or a closed tab cancels
that session's requests in the engine: their rows leave the batch at the next token.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..model import LoadedModel, cache_root
from .library import ROOT, ControllerLibrary, ProbeLibrary, VectorLibrary, make_libraries

MODEL_QUEUE = "model"  # concurrency id of jobs that train or extract (one at a time)
GENERATE_QUEUE = "generate"  # concurrency id of generation events (batched together by the engine)
GENERATE_LIMIT = int(os.environ.get("STEERING_LAB_CONCURRENCY", "16"))


def gpu(fn):
    """``spaces.GPU`` on Hugging Face ZeroGPU Spaces (where the package exists), a no-op elsewhere."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return fn
    return spaces.GPU(fn)


@dataclass
class AppContext:
    lm: LoadedModel
    vectors: VectorLibrary
    probes: ProbeLibrary
    controllers: ControllerLibrary
    _runs: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def new_run(self, session: str) -> int:
        """A new run id for ``session``; any older run of that session stops at its next token (its
        engine requests are cancelled now, whether or not their consumer ever resumes)."""
        from ..engine import engine_for

        with self._lock:
            self._runs[session] = self._runs.get(session, 0) + 1
            run = self._runs[session]
        engine_for(self.lm).cancel(session)
        return run

    def end_session(self, session: str) -> None:
        """A closed tab: cancel its requests and forget its run id (the run table stays bounded)."""
        from ..engine import engine_for

        engine_for(self.lm).cancel(session)
        with self._lock:
            self._runs.pop(session, None)

    @property
    def sessions(self) -> int:
        with self._lock:
            return len(self._runs)

    def is_current(self, session: str, run: int) -> bool:
        with self._lock:
            return self._runs.get(session, 0) == run

    def compatible_vectors(self) -> list[str]:
        """Library vectors that fit the loaded model (width and layer range)."""
        return self.compatible(self.vectors)

    def compatible(self, library) -> list[str]:
        """Names in ``library`` whose files load and fit the loaded model."""
        out = []
        for name in library.names():
            try:
                library.get(name).check_model(self.lm)
            except Exception:  # noqa: BLE001 - a broken or foreign file is listed in the Library tab, not here
                continue
            out.append(name)
        return out


def make_context(lm: LoadedModel, user_dir: str | os.PathLike | None = None,
                 shipped_root: str | os.PathLike | None = None, library_mode: str | None = None) -> AppContext:
    """Libraries: shipped ``vectors/``, ``probes/``, ``controllers/`` next to the package (read-only)
    and saved ones under ``$STEERING_LAB_LIBRARY`` (default: the cache dir's ``library``): one shared
    folder, or one per visitor (``library_mode`` / ``$STEERING_LAB_LIBRARY_MODE``; see ui/library.py)."""
    base = Path(user_dir or os.environ.get("STEERING_LAB_LIBRARY") or cache_root() / "library").expanduser()
    root = Path(shipped_root) if shipped_root is not None else ROOT
    vectors, probes, controllers = make_libraries(root, base, library_mode)
    return AppContext(lm=lm, vectors=vectors, probes=probes, controllers=controllers)


def user_errors(fn):
    """Turn UserError into gr.Error (shown to the user), keep other exceptions as they are."""
    import gradio as gr

    from ..errors import UserError

    if _is_generator(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except UserError as exc:
                raise gr.Error(str(exc)) from None
        return gen

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise gr.Error(str(exc)) from None
    return wrapper


def _is_generator(fn) -> bool:
    import inspect

    return inspect.isgeneratorfunction(fn)
