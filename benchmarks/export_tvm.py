"""TVM vs onnxruntime vs torch eager: latency, peak RSS, compile and tuning time.

Models: the Fashion-MNIST CNN as dense, pruned and JLCM artifacts (``--cnn``, e.g. from
``make demo``), and block 0 of SmolLM2-135M, dense (from the checkpoint beside ``--llm``) and
JLCM-coded (from the ``--llm`` artifact of ``benchmarks/quantize_llm.py``), fed hidden states
``[batch, 16, 576]``. Each model runs at batch 1 and 64 in:

- torch eager (this process; for the CNN also a fresh process that loads the artifact, for
  its peak RSS),
- onnxruntime (``kompakt bench``: a fresh Python process),
- TVM untuned (one bundle with a dynamic batch) and TVM tuned (MetaSchedule, ``--tune``
  trials, one static-shape bundle per batch size; ``--tune-models`` says which), both run by
  the host build of the kompakt C++ runner: a fresh process holding the TVM runtime alone.

onnxruntime and TVM are measured side by side once every model is built: ``--rounds``
rounds, each running every runtime in turn (``--repeats`` timed runs, median); a latency is
the median over the rounds, so drift on a busy machine hits every runtime alike (each
round's median is in the row too).

Peak RSS is each process's VmHWM; the floors are the same processes running a one-op model.

    .venv/bin/python benchmarks/export_tvm.py --cnn out/demo/dense,out/demo/pruned,out/demo/quantized \\
        --llm out/bench/quantize_llm/artifacts/jlcm-3.0 --tune 64
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import kompakt
from kompakt import export
from kompakt.eval import latency_ms
from kompakt.export.targets import resolve
from kompakt.runtime import runner
from kompakt.runtime.bench import bench, peak_rss_bytes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "export_tvm.jsonl"
BATCHES = (1, 64)
WARMUP = 3  # untimed runs before each measurement, as kompakt bench does for onnxruntime


class Block(nn.Module):
    """A Llama decoder layer with its rotary embedding, on hidden states ``[b, s, d]``."""

    def __init__(self, layer: nn.Module, rotary: nn.Module) -> None:
        super().__init__()
        self.layer, self.rotary = layer, rotary

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1]).unsqueeze(0)
        out = self.layer(hidden, position_embeddings=self.rotary(hidden, positions))
        return out[0] if isinstance(out, tuple) else out


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0


def torch_child(artifact: str, repeats: int) -> None:
    """Fresh-process torch eager measurement of a CNN artifact (prints one JSON line)."""
    model = kompakt.load(artifact).eval()
    latency = {b: latency_ms(model, torch.randn(b, 1, 28, 28), repeats, warmup=3) for b in BATCHES}
    print(json.dumps({"latency": latency, "peak_rss_bytes": peak_rss_bytes()}))


def tvm_runner(bundle: Path, example: torch.Tensor, batches, repeats: int) -> dict:
    latency, peak = {}, 0
    for b in batches:
        x = example[:1].repeat(b, *[1] * (example.dim() - 1)).numpy()
        _, timing = runner.run_bundle(bundle, {"input": x}, repeat=WARMUP + repeats, arch="host")
        latency[b] = statistics.median(timing["ms"][WARMUP:])
        peak = max(peak, timing["peak_rss_bytes"])
    return {"latency": latency, "peak_rss_bytes": peak, "threads": timing["threads"]}


def merged(results: list[dict]) -> dict:
    """One measurement from several runner processes (one per batch size)."""
    return {
        "latency": {b: v for r in results for b, v in r["latency"].items()},
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
        "threads": results[0]["threads"],
    }


def ort_bench(path: Path, repeats: int) -> dict:
    r = bench(path, list(BATCHES), repeats=repeats)
    return {
        "latency": {row["batch"]: row["p50_ms"] for row in r["latency"]},
        "peak_rss_bytes": r["peak_rss_bytes"],
    }


def measure(label, model, example, work: Path, args, tune: bool, artifact: str | None) -> list:
    rows, base = [], {"model": label}
    work.mkdir(parents=True, exist_ok=True)
    name = label.replace(" ", "-")
    # torch eager
    entry = {
        b: latency_ms(
            model, example[:1].repeat(b, *[1] * (example.dim() - 1)), args.repeats, warmup=3
        )
        for b in BATCHES
    }
    row = {**base, "runtime": "torch eager", "latency_ms": entry, "peak_rss_mb": None}
    if artifact:
        done = subprocess.run(
            [sys.executable, __file__, "--torch-child", artifact, "--repeats", str(args.repeats)],
            capture_output=True,
            text=True,
            check=True,
        )
        child = json.loads(done.stdout.strip().splitlines()[-1])
        row["latency_ms"] = {int(k): v for k, v in child["latency"].items()}
        row["peak_rss_mb"] = child["peak_rss_bytes"] / 1e6
    rows.append(row)
    # build every runtime's model first, then measure them in interleaved rounds
    onnx_path = work / f"{name}.onnx"
    export.onnx(model, example, onnx_path, overwrite=True, tolerance=1e-3)
    bundle = work / f"{name}-tvm"
    untuned = export.tvm(model, example, bundle, overwrite=True, tolerance=1e-3)
    runs = {
        "onnxruntime": lambda: ort_bench(onnx_path, args.repeats),
        "TVM untuned": lambda: tvm_runner(bundle, example, BATCHES, args.repeats),
    }
    extra = {
        "onnxruntime": {"model_bytes": onnx_path.stat().st_size},
        "TVM untuned": {
            "compile_s": untuned["compile_seconds"],
            "param_bytes": untuned["params"]["bytes_by_dtype"],
        },
    }
    if tune and args.tune:
        tuned, seconds = {}, {}
        for b in BATCHES:
            x = example[:1].repeat(b, *[1] * (example.dim() - 1))
            tuned[b] = (work / f"{name}-tvm-tuned-b{b}", x)
            report = export.tvm(
                model,
                x,
                tuned[b][0],
                overwrite=True,
                tolerance=1e-3,
                tune=args.tune,
                tune_dir=work / f"{name}-db-b{b}",
            )
            seconds[b] = report["compile_seconds"]
        label = f"TVM tuned ({args.tune} trials per task)"
        runs[label] = lambda: merged(
            [tvm_runner(t, x, [b], args.repeats) for b, (t, x) in tuned.items()]
        )
        extra[label] = {"compile_and_tune_s": seconds}
    measured: dict[str, list[dict]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for runtime, run in runs.items():
            measured[runtime].append(run())
    for runtime, results in measured.items():
        rows.append(
            {
                **base,
                "runtime": runtime,
                **({"threads": results[0]["threads"]} if "threads" in results[0] else {}),
                "latency_ms": {
                    b: statistics.median(r["latency"][b] for r in results) for b in BATCHES
                },
                "latency_ms_rounds": {b: [r["latency"][b] for r in results] for b in BATCHES},
                "peak_rss_mb": max(r["peak_rss_bytes"] for r in results) / 1e6,
                **extra[runtime],
            }
        )
    with args.out.open("a") as f:  # each model's rows as soon as they are measured
        for row in rows:
            print(json.dumps(row), flush=True)
            f.write(json.dumps({**args.meta, **row}) + "\n")


def floors(work: Path, repeats: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    x = torch.randn(2, 4)
    export.onnx(Identity(), x, work / "identity.onnx", overwrite=True)
    export.tvm(Identity(), x, work / "identity-tvm", overwrite=True)
    return {
        "onnxruntime_floor_mb": bench(work / "identity.onnx", [1], repeats=repeats)[
            "peak_rss_bytes"
        ]
        / 1e6,
        "tvm_runner_floor_mb": runner.run_bundle(
            work / "identity-tvm", {"input": x.numpy()}, arch="host"
        )[1]["peak_rss_bytes"]
        / 1e6,
    }


def smollm2_blocks(llm: Path) -> dict[str, nn.Module]:
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(
        str(llm.parent.parent / "checkpoint"), dtype=torch.float32
    ).eval()
    quantized = kompakt.load(llm).eval()
    return {
        "SmolLM2 block 0 fp32": Block(fp.model.layers[0], fp.model.rotary_emb).eval(),
        f"SmolLM2 block 0 JLCM ({llm.name})": Block(
            quantized.model.layers[0], quantized.model.rotary_emb
        ).eval(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cnn", help="comma-separated CNN artifacts")
    parser.add_argument(
        "--llm", type=Path, help="a JLCM SmolLM2 artifact of benchmarks/quantize_llm.py"
    )
    parser.add_argument("--tune", type=int, default=0, help="MetaSchedule trials per task")
    parser.add_argument(
        "--tune-models", default="pruned", help="comma-separated substrings of the models to tune"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement")
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds over the runtimes (median)"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench" / "export_tvm")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--torch-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_child:
        torch_child(args.torch_child, args.repeats)
        return
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "tvm_target": resolve("host").tvm,
        "command": "benchmarks/export_tvm.py " + " ".join(sys.argv[1:]),
        **floors(args.work / "floor", args.repeats),
    }
    print(json.dumps(meta), flush=True)
    args.meta = meta
    args.out.parent.mkdir(parents=True, exist_ok=True)
    wanted = [s for s in args.tune_models.split(",") if s]
    for artifact in (args.cnn or "").split(","):
        if artifact:
            label = f"CNN {Path(artifact).name}"
            model = kompakt.load(artifact).eval()
            example = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
            tune = any(w in label for w in wanted)
            measure(label, model, example, args.work / Path(artifact).name, args, tune, artifact)
    if args.llm:
        example = torch.randn(2, 16, 576, generator=torch.Generator().manual_seed(0))
        for label, block in smollm2_blocks(args.llm).items():
            tune = any(w in label for w in wanted)
            measure(
                label, block, example, args.work / label.split()[-1].strip("()"), args, tune, None
            )


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
