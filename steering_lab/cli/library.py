"""``steering-lab list``: the ready library (shipped and saved vectors, probes, controllers) and the
bundled contrast sets, read from the json sidecars (no model, no torch)."""

from __future__ import annotations

import argparse
import json

from .. import resources

WHAT = ("vectors", "probes", "controllers", "saes", "presets", "prompt-sets")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list shipped and saved vectors, probes, controllers and bundled data sets",
                       description="List what --vector/--probe/--controller accept by name, and the bundled "
                                   "contrast sets (--preset) and prompt sets.")
    p.add_argument("what", nargs="?", choices=WHAT, default=None, help="only this kind (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per item")
    p.set_defaults(run=run)


def _meta(base) -> dict:
    try:
        meta = json.loads(base.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def items(kind: str) -> list[dict]:
    """One dict per artifact of ``kind``: name, where it lives and the facts a user picks by."""
    out = []
    for name in resources.names(kind):
        base = resources.find(kind, name)
        folder_marker = resources.FOLDER_KINDS.get(kind)
        meta = _meta(base / folder_marker if folder_marker else base)
        item = {"name": name, "source": "shipped" if base.parent == resources.shipped_dir(kind) else "saved",
                "model": meta.get("model"), "description": meta.get("description", "")}
        if kind == "vectors":
            item.update(layer=meta.get("recommended_layer"), strength=meta.get("recommended_strength"))
        elif kind == "probes":
            item.update(layer=meta.get("layer"), test_auroc=(meta.get("metrics") or {}).get("test_auroc"))
        elif kind == "controllers":
            item.update(steer_layers=meta.get("steer_layers"), base_strength=meta.get("base_strength"))
        elif kind == "saes":
            item.update(hook=meta.get("hook_name"), d_sae=meta.get("d_sae"))
        out.append(item)
    return out


def run(args: argparse.Namespace) -> int:
    from ..datasets import PRESETS, PROMPT_SETS

    for what in [args.what] if args.what else WHAT:
        if what == "presets":
            rows = [{"name": n, "use": "--preset (extract, probe train)"} for n in sorted(PRESETS)]
        elif what == "prompt-sets":
            rows = [{"name": n, "use": "--preset (sweep)"} for n in PROMPT_SETS]
        else:
            rows = items(what)
        if args.json:
            for row in rows:
                print(json.dumps({"kind": what, **row}, ensure_ascii=False))
            continue
        if not rows and not args.what:
            continue
        print(f"{what}:")
        if not rows:
            print("  (none)")
        for row in rows:
            facts = [f"{k} {round(v, 3) if isinstance(v, float) else v}" for k, v in row.items()
                     if k not in ("name", "description", "source", "use") and v not in (None, "")]
            tail = row.get("description") or row.get("use") or ""
            where = " (saved)" if row.get("source") == "saved" else ""
            line = f"  {row['name']}{where}" + (f"  [{', '.join(facts)}]" if facts else "")
            print(line + (f"  {tail}" if tail else ""))
    return 0
