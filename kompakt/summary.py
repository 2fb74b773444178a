"""``kompakt inspect``: per-layer encodings and stored bytes of an artifact, with totals.

Reads only ``kompakt.json`` and the safetensors header, so it is instant on any model size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kompakt.artifact import MANIFEST_FILE, WEIGHTS_FILE, read_manifest, read_weights_header
from kompakt.errors import KompaktError


def inspect_artifact(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Rows (one per layer) and totals: parameters, stored bytes, ratios versus fp32 and fp16."""
    root = Path(path)
    manifest = read_manifest(root)
    header = read_weights_header(root / WEIGHTS_FILE)
    sizes = {name: t["data_offsets"][1] - t["data_offsets"][0] for name, t in header.items()}
    rows = []
    for layer in manifest["layers"]:
        missing = [k for k in layer["tensors"] if k not in sizes and k not in manifest["aliases"]]
        if missing:
            raise KompaktError(
                f"{root / MANIFEST_FILE}: layer {layer['name']!r} lists tensor {missing[0]!r}, "
                f"which {WEIGHTS_FILE} lacks; re-create the artifact"
            )
        encoding = layer["method"] + (f" {layer['bits']}-bit" if "bits" in layer else "")
        if layer["method"] == "tied":
            encoding = f"tied to {layer['tied_to']}"
        rows.append(
            {
                "name": layer["name"] or "(root)",
                "type": layer["type"],
                "encoding": encoding,
                "params": layer["params"],
                "fp32_bytes": layer["fp32_bytes"],
                "bytes": sum(sizes.get(k, 0) for k in layer["tensors"]),
            }
        )
    stored = sum(sizes.values())
    fp32 = sum(r["fp32_bytes"] for r in rows)
    totals = {
        "params": sum(r["params"] for r in rows),
        "bytes": stored,
        "fp32_bytes": fp32,
        "ratio_vs_fp32": fp32 / stored if stored else float("nan"),
        "ratio_vs_fp16": fp32 / 2 / stored if stored else float("nan"),
    }
    return {
        "source": manifest["source"].get("label"),
        "inputs": manifest.get("inputs", []),
        "steps": manifest["steps"],
        "rows": rows,
        "totals": totals,
    }


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _metric(name: str, value: Any) -> str:
    if isinstance(value, float) and name.endswith("accuracy"):
        return f"{value:.2%}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_inspection(info: dict[str, Any]) -> str:
    """The inspection as a plain-text table."""
    headers = ("layer", "type", "encoding", "params", "bytes")
    body = [
        (r["name"], r["type"], r["encoding"], f"{r['params']:,}", f"{r['bytes']:,}")
        for r in info["rows"]
    ]
    widths = [
        max(len(h), *(len(row[i]) for row in body)) if body else len(h)
        for i, h in enumerate(headers)
    ]
    align = ("<", "<", "<", ">", ">")

    def line(cells) -> str:
        return "  ".join(
            f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths, strict=True)
        ).rstrip()

    t = info["totals"]
    out = [f"source: {info['source']}"]
    for spec in info["inputs"]:
        dims = ", ".join("batch" if d is None else str(d) for d in spec["shape"])
        out.append(f"input: {spec['name']} {spec['dtype']} [{dims}]")
    for i, step in enumerate(info["steps"], 1):
        metrics = ", ".join(f"{k} {_metric(k, v)}" for k, v in step["metrics"].items())
        out.append(f"step {i}: {step['method']}" + (f" ({metrics})" if metrics else ""))
    out += [line(headers), line(["-" * w for w in widths])]
    out += [line(row) for row in body]
    out += [
        line(["-" * w for w in widths]),
        f"total: {t['params']:,} parameters, {t['bytes']:,} bytes stored ({_human(t['bytes'])})",
        f"compression: {t['ratio_vs_fp32']:.2f}x vs fp32 ({_human(t['fp32_bytes'])}), "
        f"{t['ratio_vs_fp16']:.2f}x vs fp16",
    ]
    return "\n".join(out)
