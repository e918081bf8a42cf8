"""Sparse autoencoder (SAE) features: load sae-lens SAEs, steer with a feature, clamp a feature,
find what a feature fires on, and express a steering vector in features.

Format: sae-lens' on-disk layout, a folder with ``cfg.json`` + ``sae_weights.safetensors``
(optionally our ``features.json``: per-feature labels, top tokens and contexts). Loading goes
through ``sae_lens.SAE.load_from_disk`` (a local folder or a shipped name) or
``SAE.from_pretrained(release, sae_id)`` (hub release ids, for users with network access).

Layers: an SAE trained on ``blocks.k.hook_resid_post`` (TransformerLens naming) reads the output
of decoder block ``k``: our layer ``k`` (DESIGN.md). ``blocks.k.hook_resid_pre`` is the output of
block ``k - 1``; HF-style names (``model.layers.k``, ``layers.k``, ``transformer.h.k``) name the
block whose output is read. Other hooks (attention, MLP, ``hook_z``) are refused: steering here acts
on block outputs.

Token position 0 is left out of feature statistics: in most causal LMs it is the attention sink,
whose residual norm is tens of times the others' and which SAEs do not reconstruct.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError, check
from .intervene import Steer, capture
from .vector import SteeringVector, atomic_write_json

log = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
INDEX_FILE = "features.json"

_RESID = [
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), 0),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), -1),
    (re.compile(r"^(?:model\.)?(?:language_model\.)?(?:decoder\.)?layers\.(\d+)(?:\.output)?$"), 0),
    (re.compile(r"^(?:transformer\.h|gpt_neox\.layers|h)\.(\d+)(?:\.output)?$"), 0),
    (re.compile(r"^hidden_states\.(\d+)$"), -1),
]


def hook_to_layer(hook_name: str) -> int:
    """Our layer index (output of decoder block k) for an SAE hook name; UserError if it is not a
    residual-stream block output."""
    name = (hook_name or "").strip()
    for pattern, shift in _RESID:
        m = pattern.match(name)
        if m:
            k = int(m.group(1)) + shift
            check(k >= 0, f"SAE hook {name!r} reads the embeddings (before block 0), not a block output; "
                          "steering here acts on block outputs")
            return k
    raise UserError(f"SAE hook {name!r} is not a residual-stream block output (supported: "
                    "blocks.K.hook_resid_post, blocks.K.hook_resid_pre, model.layers.K, transformer.h.K)")


def layer_to_hook(layer: int) -> str:
    """The sae-lens (TransformerLens) hook name of our layer ``layer``."""
    return f"blocks.{int(layer)}.hook_resid_post"


def _sae_lens():
    try:
        import sae_lens
    except ImportError as exc:  # pragma: no cover - it is in requirements.txt
        raise UserError("SAE features need the sae-lens package: pip install sae-lens") from exc
    return sae_lens


def sae_names() -> list[str]:
    """Names of the shipped and the user's SAE folders (each holds a ``cfg.json``)."""
    from .resources import names

    return names("saes")


def find_sae(spec: str | os.PathLike) -> Path | None:
    """A local SAE folder: ``spec`` itself, or a shipped / user SAE of that name."""
    from .resources import find

    return find("saes", spec)


def read_index(spec: str | os.PathLike) -> dict[str, Any]:
    """The ``features.json`` of a local SAE (empty if it has none); needs no sae-lens import."""
    folder = find_sae(spec)
    check(folder is not None, f"no SAE folder called {os.fspath(spec)!r}")
    path = folder / INDEX_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None


@dataclass
class LoadedSAE:
    """An sae-lens SAE with the layer it reads, where it came from, and its feature index."""

    sae: Any
    layer: int
    hook_name: str
    source: str
    name: str
    index: dict[str, Any] = field(default_factory=dict)  # features.json (labels, top tokens), if any

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def model_name(self) -> str:
        return str(self.sae.cfg.metadata.model_name or "")

    def feature_info(self, feature: int) -> dict[str, Any]:
        return self.index.get("features", {}).get(str(int(feature)), {})

    def label(self, feature: int) -> str:
        return str(self.feature_info(feature).get("label", ""))

    def check_feature(self, feature: int) -> int:
        check(isinstance(feature, int) and not isinstance(feature, bool) and 0 <= feature < self.d_sae,
              f"feature must be an integer in 0..{self.d_sae - 1}, got {feature!r}")
        return int(feature)

    def decoder_row(self, feature: int) -> torch.Tensor:
        """``W_dec[feature]`` as a float32 CPU tensor ``[d_in]``."""
        return self.sae.W_dec[self.check_feature(feature)].detach().to("cpu", torch.float32).clone()

    def on(self, device: torch.device | str) -> Any:
        """The sae-lens module on ``device`` (moved once, then reused)."""
        device = torch.device(device)
        if self.sae.W_dec.device != device:
            self.sae.to(device)
        return self.sae

    @torch.no_grad()
    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]`` (float32 on the SAE's dtype path) of residuals ``h``."""
        sae = self.on(h.device)
        return sae.encode(h.to(sae.dtype)).float()

    @torch.no_grad()
    def decode(self, f: torch.Tensor) -> torch.Tensor:
        sae = self.on(f.device)
        return sae.decode(f.to(sae.dtype)).float()

    def check_model(self, lm: Any) -> None:
        """UserError unless this SAE reads a layer of ``lm`` with ``lm``'s width."""
        check(self.d_in == lm.d_model,
              f"SAE {self.name} reads vectors of width {self.d_in} ({self.model_name or 'unknown model'}) but "
              f"{lm.name} has d_model {lm.d_model}")
        check(0 <= self.layer < lm.n_layers,
              f"SAE {self.name} reads layer {self.layer} ({self.hook_name}) but {lm.name} has {lm.n_layers} "
              f"blocks (layers 0-{lm.n_layers - 1})")
        if self.model_name and self.model_name.split("/")[-1].lower() not in str(lm.name).lower():
            log.warning("SAE %s was trained on %s, the loaded model is %s", self.name, self.model_name, lm.name)


def _wrap(sae: Any, source: str, name: str, folder: Path | None) -> LoadedSAE:
    check(getattr(sae.cfg, "reshape_activations", "none") == "none",
          f"SAE {name} reads attention heads (hook_z); steering here acts on block outputs")
    check(getattr(sae.cfg.metadata, "hook_head_index", None) is None,
          f"SAE {name} reads one attention head; steering here acts on block outputs")
    hook = str(sae.cfg.metadata.hook_name or "")
    check(bool(hook), f"SAE {name} does not say which hook it reads (metadata.hook_name in {CFG_FILE})")
    index: dict[str, Any] = {}
    if folder is not None and (folder / INDEX_FILE).is_file():
        try:
            index = json.loads((folder / INDEX_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{folder / INDEX_FILE} is not valid JSON: {exc}") from None
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    return LoadedSAE(sae=sae, layer=hook_to_layer(hook), hook_name=hook, source=source, name=name, index=index)


def load_sae(spec: str | os.PathLike, lm: Any = None, *, sae_id: str | None = None, device: str = "cpu",
             dtype: str = "float32") -> LoadedSAE:
    """Load an SAE: a folder in sae-lens format, a shipped/user SAE name, or a hub release
    (``load_sae("gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre")`` or ``"RELEASE:SAE_ID"``).
    With ``lm`` the SAE is checked to fit the model (width and layer)."""
    folder = find_sae(spec) if sae_id is None else None
    if folder is not None:
        check((folder / WEIGHTS_FILE).is_file(), f"{folder} has {CFG_FILE} but no {WEIGHTS_FILE}")
        SAE = _sae_lens().SAE
        try:
            sae = SAE.load_from_disk(str(folder), device=device, dtype=dtype)
        except (KeyError, ValueError, TypeError, OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{folder} is not a valid sae-lens SAE: {type(exc).__name__}: {exc}") from None
        loaded = _wrap(sae, str(folder), folder.name, folder)
    else:
        text = os.fspath(spec)
        release = text
        if sae_id is None:
            check(":" in text, f"no SAE folder called {text!r} (a folder with {CFG_FILE} + {WEIGHTS_FILE}, "
                               f"a shipped SAE {sae_names()}, or a hub release as RELEASE:SAE_ID)")
            release, sae_id = text.split(":", 1)
        SAE = _sae_lens().SAE
        try:
            sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
        except Exception as exc:  # noqa: BLE001 - network, hub and registry errors all mean "cannot load it"
            raise UserError(f"could not load SAE {release}:{sae_id} from the hub ({type(exc).__name__}: "
                            f"{str(exc)[:200]}); offline, give a local folder in sae-lens format "
                            f"({CFG_FILE} + {WEIGHTS_FILE})") from None
        loaded = _wrap(sae, f"{release}:{sae_id}", f"{release}:{sae_id}", None)
    if lm is not None:
        loaded.check_model(lm)
    return loaded


def save_sae(loaded: LoadedSAE, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``folder/cfg.json`` + ``sae_weights.safetensors`` (sae-lens format) and our
    ``features.json``, atomically: the folder is written beside the target and renamed into place."""
    target = Path(folder).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        sae = loaded.sae
        if dtype is not None:
            sae = _copy_as(sae, dtype)
        sae.save_model(tmp)
        cfg = json.loads((tmp / CFG_FILE).read_text())
        if cfg.get("device") != "cpu":  # where it was trained is no default for whoever loads it
            cfg["device"] = "cpu"
            atomic_write_json(tmp / CFG_FILE, cfg)
        if loaded.index:
            atomic_write_json(tmp / INDEX_FILE, loaded.index)
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _copy_as(sae: Any, dtype: torch.dtype) -> Any:
    """A copy of ``sae`` whose weights (and cfg.dtype) are ``dtype``."""
    import copy

    out = copy.deepcopy(sae)
    out.to(dtype=dtype)
    out.cfg.dtype = str(dtype).replace("torch.", "")
    return out


# ---- features as steering directions ------------------------------------------------------

def feature_vector(sae: LoadedSAE, feature: int, *, normalize: bool = True, lm: Any = None) -> SteeringVector:
    """Feature ``feature``'s decoder row as a steering vector at the SAE's layer (unit norm by
    default). Saved, swept and exported like any other vector."""
    feature = sae.check_feature(feature)
    row = sae.decoder_row(feature)
    norm = float(row.norm())
    check(norm > 0, f"feature {feature} has a zero decoder row")
    info = sae.feature_info(feature)
    # the SAE's measured default (bench/sae.py --store) is for unit vectors; none is guessed
    strength = sae.index.get("steering", {}).get("recommended_strength")
    if strength is not None and not normalize:
        strength = round(float(strength) / norm, 4)
    label = info.get("label", "")
    vec = SteeringVector(
        directions={sae.layer: row / norm if normalize else row},
        model=lm.name if lm is not None else sae.model_name, n_layers=lm.n_layers if lm is not None else None,
        method="sae_feature", dataset=sae.name, recommended_layer=sae.layer, recommended_strength=strength,
        normalized=normalize,
        description=f"SAE {sae.name} feature {feature}" + (f": {label}" if label else ""),
        extra={"sae": {"name": sae.name, "source": sae.source, "hook_name": sae.hook_name, "feature": feature,
                       "label": label, "decoder_norm": norm, "max_act": info.get("max_act")}})
    if lm is not None:
        vec.check_model(lm)
    return vec


def clamp_codes(sae: LoadedSAE, h: torch.Tensor, feature: int, value: torch.Tensor | float,
                only_active: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h', f, f')``: ``f = encode(h)``, ``f'`` = ``f`` with feature set to ``value``, and
    ``h' = h + decode(f') - decode(f)`` (the SAE's error term ``h - decode(f)`` is kept)."""
    f = sae.encode(h)
    v = torch.as_tensor(value, dtype=f.dtype, device=f.device)
    while v.dim() > f.dim() - 1:
        v = v.squeeze(-1)
    new_i = v.expand(f.shape[:-1])
    if only_active:
        new_i = torch.where(f[..., feature] > 0, new_i, f[..., feature])
    f2 = f.clone()
    f2[..., feature] = new_i
    delta = sae.decode(f2) - sae.decode(f)
    return (h.float() + delta).to(h.dtype), f, f2


def feature_clamp(sae: LoadedSAE, feature: int, value: float | Sequence[float] = 0.0, *,
                  only_active: bool = False, scope: str = "all", rows: Sequence[bool] | None = None) -> Steer:
    """An intervention that sets feature ``feature``'s activation to the strength ``s`` at the SAE's
    layer, through encode/decode with the error term kept: ``h + (s - f_i) W_dec[i]`` for a linear
    decoder. ``s`` equal to the current activation changes nothing; ``s = 0`` ablates the feature.
    With ``only_active`` positions where the feature is off are left alone; ``rows`` limits it to
    some batch rows (e.g. baseline and clamped side by side in one batch)."""
    feature = sae.check_feature(feature)

    def transform(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return clamp_codes(sae, h, feature, s, only_active)[0]

    return Steer(feature_vector(sae, feature, normalize=False), value, layers=[sae.layer], operator="transform",
                 scope=scope, rows=rows, transform=transform)


def vector_features(sae: LoadedSAE, vector: SteeringVector, k: int = 10) -> list[dict[str, Any]]:
    """The features a vector loads on: top-``k`` |cosine| between its direction at the SAE's layer
    and the decoder rows, with signs and labels."""
    return top_cosines(sae.sae.W_dec.detach(), sae.layer, vector, k, sae.label)


def top_cosines(W_dec: torch.Tensor, layer: int, vector: SteeringVector, k: int = 10,
                label: Any = None) -> list[dict[str, Any]]:
    """Top-``k`` |cosine| between ``vector[layer]`` and the rows of ``W_dec`` [d_sae, d_in]."""
    check(layer in vector.directions,
          f"the vector has no direction at layer {layer} (the SAE's layer); it has layers {vector.layers}")
    v = vector[layer].float().cpu()
    W = W_dec.float().cpu()
    check(v.shape[0] == W.shape[1], f"the vector has width {v.shape[0]}, the SAE reads {W.shape[1]}")
    check(float(v.norm()) > 0, "the vector is zero at the SAE's layer")
    cos = (W @ v) / (W.norm(dim=1).clamp_min(1e-12) * v.norm())
    top = cos.abs().topk(min(int(k), W.shape[0]))
    return [{"feature": int(i), "cosine": round(float(cos[i]), 4), "label": label(int(i)) if label else ""}
            for i in top.indices.tolist()]


def read_decoder(spec: str | os.PathLike) -> tuple[int, torch.Tensor, dict[str, Any]]:
    """``(layer, W_dec float32 [d_sae, d_in], features.json)`` of a local SAE, read straight from its
    files (no sae-lens import: cheap enough for the Library tab)."""
    from safetensors import safe_open

    folder = find_sae(spec)
    check(folder is not None, f"no SAE folder called {os.fspath(spec)!r}")
    try:
        cfg = json.loads((folder / CFG_FILE).read_text())
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as fh:
            W = fh.get_tensor("W_dec").float()
    except Exception as exc:  # noqa: BLE001 - a broken file is a clear user-facing error
        raise UserError(f"{folder} is not a readable sae-lens SAE: {type(exc).__name__}: {exc}") from None
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name", "")
    return hook_to_layer(hook), W, read_index(folder)


# ---- what features fire on ----------------------------------------------------------------

@dataclass
class TokenCodes:
    """Feature activations of one batch of texts: ``codes[b, t]`` for token ``ids[b][t]``;
    ``valid[b, t]`` is False for padding and for position 0 (see the module docstring)."""

    ids: list[list[int]]
    codes: torch.Tensor  # [B, T, d_sae] float32, right-aligned rows (left padding)
    valid: torch.Tensor  # [B, T] bool
    rows: list[int]  # index of each row in the caller's text list


def tokenize_texts(lm: Any, texts: Sequence[str], max_tokens: int = 128) -> list[list[int]]:
    """Plain-text token ids (with the tokenizer's BOS, if any), cut to ``max_tokens``."""
    return [lm.encode(t, special=True)[:max_tokens] for t in texts]


def iter_codes(lm: Any, sae: LoadedSAE, seqs: Sequence[Sequence[int]], *, batch_size: int = 8,
               skip_first: bool = True, progress: bool = False) -> Iterator[TokenCodes]:
    """Run the model up to the SAE's layer on token sequences and encode every token."""
    from tqdm.auto import tqdm

    from .activations import pad_left

    sae.check_model(lm)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="SAE codes", disable=not progress, leave=False):
        rows = [list(seqs[i]) for i in batch]
        ids, mask, pos = pad_left(rows, lm.pad_id, lm.device)
        with torch.inference_mode(), capture(lm, [sae.layer], stop_early=True) as cap:
            cap.forward(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
            h = cap.last(sae.layer)
        codes = sae.encode(h).cpu()
        valid = mask.bool().cpu()
        if skip_first:
            valid &= pos.cpu() > 0
        yield TokenCodes(ids=rows, codes=codes, valid=valid, rows=batch)


def feature_strip(lm: Any, sae: LoadedSAE, text: str, feature: int,
                  max_tokens: int = 256) -> tuple[list[str], list[float]]:
    """Tokens of ``text`` and feature ``feature``'s activation on each (NaN at position 0)."""
    feature = sae.check_feature(feature)
    check(bool(text and text.strip()), "the text is empty")
    seq = tokenize_texts(lm, [text], max_tokens)
    item = next(iter_codes(lm, sae, seq, batch_size=1))
    T = len(seq[0])
    vals = item.codes[0, -T:, feature]
    ok = item.valid[0, -T:]
    values = [float(v) if o else float("nan") for v, o in zip(vals.tolist(), ok.tolist())]
    tokens = [lm.tokenizer.decode([i]) for i in seq[0]]
    return tokens, values


def top_features(lm: Any, sae: LoadedSAE, text: str, k: int = 10, max_tokens: int = 256) -> list[dict[str, Any]]:
    """The features most active on ``text``: by max activation over its tokens (position 0 left out)."""
    check(bool(text and text.strip()), "the text is empty")
    seq = tokenize_texts(lm, [text], max_tokens)
    item = next(iter_codes(lm, sae, seq, batch_size=1))
    codes = item.codes[0][item.valid[0]]
    check(codes.shape[0] > 0, "the text needs at least two tokens")
    tokens = [t for t, ok in zip(item.ids[0], item.valid[0, -len(item.ids[0]):].tolist()) if ok]
    best, where = codes.max(0)
    top = best.topk(min(int(k), sae.d_sae))
    out = []
    for value, i in zip(top.values.tolist(), top.indices.tolist()):
        if value <= 0:
            break
        out.append({"feature": int(i), "max_act": round(value, 3),
                    "token": lm.tokenizer.decode([tokens[int(where[i])]]),
                    "n_tokens": int((codes[:, i] > 0).sum()), "label": sae.label(int(i))})
    return out


class IndexBuilder:
    """Accumulates, per feature, its top-``top_n`` activations (with the global token index of
    each), how often it fires, and the L0; ``finish`` turns that into ``features.json`` content."""

    def __init__(self, d_sae: int, top_n: int = 24) -> None:
        self.top_n = top_n
        self.best_v = torch.full((top_n, d_sae), -1.0)
        self.best_at = torch.zeros((top_n, d_sae), dtype=torch.long)
        self.fired = torch.zeros(d_sae, dtype=torch.long)
        self.n_tokens = 0
        self.l0_sum = 0.0

    def add(self, codes: torch.Tensor, where: torch.Tensor) -> None:
        """``codes`` [M, d_sae] activations of ``M`` tokens at global token indices ``where`` [M]."""
        codes = codes.float()
        if self.best_v.device != codes.device:
            moved = (t.to(codes.device) for t in (self.best_v, self.best_at, self.fired))
            self.best_v, self.best_at, self.fired = moved
        active = codes > 0
        self.n_tokens += codes.shape[0]
        self.fired += active.sum(0)
        self.l0_sum += float(active.sum())
        vals = torch.cat([self.best_v, codes])
        ats = torch.cat([self.best_at, where.to(codes.device)[:, None].expand(-1, codes.shape[1])])
        top = vals.topk(self.top_n, dim=0)
        self.best_v, self.best_at = top.values, ats.gather(0, top.indices)

    def finish(self, seqs: Sequence[Sequence[int]], decode: Any, n_contexts: int = 3) -> dict[str, Any]:
        check(self.n_tokens > 0, "the texts have no tokens past position 0")
        self.best_v, self.best_at, self.fired = (t.cpu() for t in (self.best_v, self.best_at, self.fired))
        starts = [0]
        for s in seqs:
            starts.append(starts[-1] + len(s))
        flat = [t for s in seqs for t in s]
        owner = torch.searchsorted(torch.tensor(starts[1:]), torch.arange(len(flat)), right=True).tolist()
        features: dict[str, Any] = {}
        for i in range(self.best_v.shape[1]):
            if int(self.fired[i]) == 0:
                continue
            hits = [(float(v), int(a)) for v, a in zip(self.best_v[:, i].tolist(), self.best_at[:, i].tolist())
                    if v > 0]
            counts: dict[str, int] = {}
            for _, a in hits:
                tok = decode([flat[a]])
                counts[tok] = counts.get(tok, 0) + 1
            top_tokens = sorted(counts, key=lambda t: -counts[t])[:8]
            contexts = []
            for v, a in hits[:n_contexts]:
                lo, hi = max(starts[owner[a]], a - 10), min(starts[owner[a] + 1], a + 4)
                contexts.append({"act": round(v, 3), "text": decode(flat[lo:a]) + "[[" + decode([flat[a]]) + "]]"
                                 + decode(flat[a + 1:hi])})
            features[str(i)] = {"label": label_from_tokens(top_tokens), "top_tokens": top_tokens,
                                "max_act": round(hits[0][0], 3) if hits else 0.0,
                                "freq": round(int(self.fired[i]) / self.n_tokens, 6), "contexts": contexts}
        d = self.best_v.shape[1]
        return {"n_tokens": self.n_tokens, "l0": round(self.l0_sum / self.n_tokens, 3),
                "dead_fraction": round(1 - len(features) / d, 4), "features": features}


def label_from_tokens(tokens: Sequence[str], n: int = 3) -> str:
    """A readable label: the feature's most frequent top tokens, whitespace shown, joined by ' / '."""
    shown = []
    for t in tokens[:n]:
        s = t.strip()
        shown.append(s if s else repr(t))  # whitespace tokens as '\\n', ' '
    return " / ".join(shown)


def build_index(lm: Any, sae: LoadedSAE, texts: Sequence[str], *, max_tokens: int = 128, top_n: int = 24,
                n_contexts: int = 3, batch_size: int = 8, progress: bool = False,
                corpus: str = "") -> dict[str, Any]:
    """Feature index over ``texts``: per feature its top-activating tokens and contexts, firing
    frequency, max activation and a readable label (its most frequent top tokens); plus L0 and the
    dead fraction. The result is what ``features.json`` holds."""
    check(len(texts) > 0, "no texts to index")
    seqs = tokenize_texts(lm, texts, max_tokens)
    builder = IndexBuilder(sae.d_sae, top_n)
    starts = [0]
    for s in seqs:
        starts.append(starts[-1] + len(s))
    for item in iter_codes(lm, sae, seqs, batch_size=batch_size, progress=progress):
        T = item.codes.shape[1]
        gidx = torch.full((len(item.rows), T), -1, dtype=torch.long)
        for b, r in enumerate(item.rows):
            n = len(seqs[r])
            gidx[b, T - n:] = torch.arange(starts[r], starts[r] + n)
        builder.add(item.codes[item.valid], gidx[item.valid])
    out = {"model": lm.name, "layer": sae.layer, "hook_name": sae.hook_name, "corpus": corpus,
           "n_texts": len(texts)}
    out.update(builder.finish(seqs, lm.tokenizer.decode, n_contexts))
    return out


@torch.no_grad()
def reconstruction_stats(lm: Any, sae: LoadedSAE, texts: Sequence[str], *, max_tokens: int = 128,
                         batch_size: int = 8) -> dict[str, float]:
    """Explained variance ``1 - sum|h - h_hat|^2 / sum|h - mean(h)|^2`` over the tokens of ``texts``
    (position 0 left out), mean L0, the fraction of features that never fire, and token count."""
    seqs = tokenize_texts(lm, texts, max_tokens)
    from .activations import pad_left

    sae.check_model(lm)
    err, tot_sq, tot_sum, n, l0 = 0.0, 0.0, torch.zeros(sae.d_in, dtype=torch.float64), 0, 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for i in range(0, len(seqs), batch_size):
        rows = seqs[i:i + batch_size]
        ids, mask, pos = pad_left(rows, lm.pad_id, lm.device)
        with torch.inference_mode(), capture(lm, [sae.layer], stop_early=True) as cap:
            cap.forward(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
            h = cap.last(sae.layer)
        keep = (mask.bool() & (pos > 0)).to(h.device)
        x = h[keep].float()
        f = sae.encode(x)
        xh = sae.decode(f)
        err += float(((x - xh) ** 2).sum())
        tot_sq += float((x.double() ** 2).sum())
        tot_sum += x.double().sum(0).cpu()
        n += x.shape[0]
        l0 += float((f > 0).sum())
        fired |= (f > 0).any(0).cpu()
    check(n > 0, "no tokens past position 0 to measure on")
    var = tot_sq - float((tot_sum ** 2).sum()) / n
    return {"explained_variance": 1 - err / var, "l0": l0 / n, "dead_fraction": 1 - float(fired.float().mean()),
            "n_tokens": n}
