"""The Fashion-MNIST CNN quantized by JLCM, k-means, GPTQ and RTN at 4, 3 and 2 bits.

Every run starts from the same trained artifact (``--artifact``, e.g. ``out/demo/dense`` or
``out/demo/pruned`` from ``make demo``), calibrates on the first ``--calib`` training images
and reports test top-1 over the 10,000 test images, bits per weight (codes, codebooks,
scales, row groups; over the coded layers) and the artifact's weight bytes. RTN and GPTQ use
an fp16 scale and offset per ``--block`` input columns; k-means and JLCM one fp16 codebook per
group of 8 output neurons. All Conv2d and Linear layers are quantized, the stem included.

    .venv/bin/python benchmarks/quantize_cnn.py --artifact out/demo/dense
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

import kompakt
from kompakt.compress.quantize import QuantizeConfig, quantize
from kompakt.data import fashion_mnist
from kompakt.eval import accuracy
from kompakt.pipeline import stored_bytes

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--bits", default="4,3,2")
    parser.add_argument("--methods", default="jlcm,kmeans,gptq,rtn")
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantize_cnn.jsonl"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, test = fashion_mnist("train"), fashion_mnist("test")
    calibration = list(train[0][: args.calib].split(128))
    meta = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s)",
        "command": "benchmarks/quantize_cnn.py --artifact " + str(args.artifact),
        "artifact": str(args.artifact),
    }
    fp = kompakt.load(args.artifact)
    rows = [
        {
            "method": "fp32",
            "bits": 32,
            "bits_per_weight": 32.0,
            "bytes": stored_bytes(fp),
            "top1": accuracy(fp, *test),
            "seconds": 0.0,
        }
    ]
    for bits in [float(b) for b in args.bits.split(",")]:
        for method in args.methods.split(","):
            model = kompakt.load(args.artifact)
            t0 = time.perf_counter()
            quantize(
                model,
                QuantizeConfig(method=method, bits=bits, block=args.block),
                calibration,
                progress=False,
            )
            seconds = time.perf_counter() - t0
            m = kompakt.artifact.record_of(model).steps[-1]["metrics"]
            rows.append(
                {
                    "method": method,
                    "bits": bits,
                    "bits_per_weight": round(m["bits_per_weight"], 3),
                    "bytes": stored_bytes(model),
                    "top1": accuracy(model, *test),
                    "seconds": round(seconds, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps({**meta, **row}) + "\n")


if __name__ == "__main__":
    main()
