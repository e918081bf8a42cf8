"""``steering-lab export`` (a vector to llama.cpp GGUF or safetensors) and ``steering-lab import``
(a GGUF control vector or a repeng/safetensors file into our format)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..constants import EXPORT_FORMATS
from ..errors import check
from . import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a vector as a llama.cpp control vector (GGUF) or as safetensors",
                       description="Write a vector for another tool. gguf: llama.cpp's control-vector format "
                                   "(use with llama-cli --control-vector FILE); safetensors: our format "
                                   "(PATH.safetensors + PATH.json), e.g. pre-scaled.")
    p.add_argument("--vector", required=True, help="a path, or the name of a shipped or saved vector")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--scale", type=common.finite_float, default=None,
                   help="multiply the directions by S before writing (e.g. the strength you steer with; may be "
                        "negative)")
    p.add_argument("--model-hint", default=None,
                   help="gguf: controlvector.model_hint (default: from the vector's model)")
    p.add_argument("--out", required=True, help="output file (FILE.gguf, or PATH for PATH.safetensors + PATH.json)")
    p.set_defaults(run=run_export)

    p = sub.add_parser("import", help="read a llama.cpp GGUF control vector or a repeng/safetensors vector",
                       description="Read a vector made elsewhere (llama.cpp control-vector GGUF, repeng "
                                   "safetensors, ...) and save it in our format (PATH.safetensors + PATH.json).")
    p.add_argument("file", metavar="FILE", help="the vector file to import")
    p.add_argument("--name", default=None, help="name recorded in the vector's metadata")
    p.add_argument("--model", default=None,
                   help="check the vector against this model (HF id, directory, .gguf, or 'embedded') and record it")
    p.add_argument("--out", required=True, help="output path (PATH.safetensors + PATH.json)")
    p.set_defaults(run=run_import)


def run_export(args: argparse.Namespace) -> int:
    from ..vector import base_path

    vec = common.load_vector(args.vector)
    if args.format == "gguf":
        from ..export import export_gguf

        check(Path(args.out).name not in ("", ".gguf"), "--out needs a file name")
        path = export_gguf(vec, args.out, scale=args.scale, model_hint=args.model_hint)  # adds .gguf if missing
        use = f"--control-vector {path}" if args.scale is not None else \
            f"--control-vector-scaled {path} {vec.recommended_strength or 'STRENGTH'}"
        print(f"wrote {path} (llama.cpp: {use})")
        return 0
    check(args.model_hint is None, "--model-hint goes with --format gguf")
    out = base_path(args.out)
    check(out.name != "", "--out needs a file name")
    saved = (vec * args.scale if args.scale is not None else vec).save(out)
    print(f"saved {saved}.safetensors and {saved}.json")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from ..export import import_vector
    from ..vector import base_path

    out = base_path(args.out)
    check(out.name != "", "--out needs a file name")
    source = Path(args.file).expanduser()
    lm = None
    if args.model is not None:
        from ..model import load_model

        lm = load_model(args.model)
    vec = import_vector(source, name=args.name, lm=lm)
    saved = vec.save(out)
    print(f"imported {source} ({len(vec.layers)} layers, d_model {vec.d_model}, model {vec.model or 'unknown'})")
    print(f"saved {saved}.safetensors and {saved}.json")
    return 0
