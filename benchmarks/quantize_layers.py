"""Per-layer output error of SmolLM2-135M's Linear layers at 3 bits, on held-out inputs.

For one decoder block (``--layer``), the input moments ``H`` of its q_proj, o_proj and
down_proj are measured on the first ``--windows`` WikiText-2 *valid* windows (calibration)
and, separately, on as many *test* windows (held out), with the fp model. Each method
quantizes the weight with the calibration ``H``; the table gives the relative output error
``tr(E H E^T) / tr(W H W^T)`` under both, for several damping values.

Needs the checkpoint and windows that ``benchmarks/quantize_llm.py`` prepares.

    .venv/bin/python benchmarks/quantize_layers.py --layer 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kompakt.compress.quantize.affine import gptq_coded
from kompakt.compress.quantize.calibration import output_error, record_inputs
from kompakt.compress.quantize.codebooks import group_count, kmeans_coded
from kompakt.compress.quantize.decoder import _run_block
from kompakt.compress.quantize.jlcm import jlcm_coded

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")


def moments(model, ids: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    base = model.model
    with torch.no_grad():
        hidden = base.embed_tokens(ids)
        rope = base.rotary_emb(hidden[:1], torch.arange(ids.shape[1])[None])
        for block in base.layers[:layer]:
            hidden = _run_block(block, hidden, rope)
        block = base.layers[layer]
        with record_inputs({n: block.get_submodule(n) for n in NAMES}) as acc:
            _run_block(block, hidden, rope)
    return {n: acc[n].hessian() for n in NAMES}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--damps", default="0.01,0.2")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench" / "quantize_llm")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantize_layers.jsonl"
    )
    args = parser.parse_args()
    windows = load_file(str(args.work / "windows.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(
        str(args.work / "checkpoint"), dtype=torch.float32
    ).eval()
    calib = moments(model, windows["valid"][: args.windows], args.layer)
    held = moments(model, windows["test"][: args.windows], args.layer)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "layer": args.layer,
        "windows": args.windows,
        "bits": args.bits,
    }
    with args.out.open("a") as f:
        for name in NAMES:
            w = model.model.layers[args.layer].get_submodule(name).weight.detach().float()
            groups = group_count(w.shape[0], 8)
            for damp in (float(d) for d in args.damps.split(",")):
                decoded = {
                    "gptq g128": gptq_coded(w, calib[name], args.bits, 128, damp).decode(),
                    "kmeans": kmeans_coded(w, calib[name], args.bits, groups).decode(),
                    "jlcm": jlcm_coded(w, calib[name], args.bits, groups, 60, damp=damp)[
                        0
                    ].decode(),
                }
                for method, wq in decoded.items():
                    row = {
                        **meta,
                        "module": name,
                        "method": method,
                        "damp": damp,
                        "calibration_error": round(output_error(w, wq, calib[name]), 5),
                        "held_out_error": round(output_error(w, wq, held[name]), 5),
                    }
                    f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
