"""SmolLM2-135M on WikiText-2: fp, RTN, k-means, GPTQ and JLCM at several bits per weight.

Protocol: perplexity over the first ``--windows`` (128) non-overlapping 512-token windows of
the WikiText-2 *test* split; calibration on the first ``--calib`` (16) windows of *valid*
only, every method on all of them (``--block-windows`` narrows only JLCM's per-block
phases). Every quantized model is produced by ``quantize_checkpoint`` streaming the safetensors
checkpoint block by block, in a fresh process per run so that its peak RSS is its own. All
methods quantize every Linear layer and the tied embedding / lm_head table; fractional bits
are per-layer mixes (the token table takes the wider width). RTN and GPTQ use asymmetric
grids with an fp16 scale and offset per ``--block`` columns; k-means and JLCM one fp16
codebook per group of 8 output neurons. Sizes are the artifact's safetensors file
(codes, codebooks, scales, row groups, fp32 norms).

Each run's process has glibc's malloc keep freed memory (``MALLOC_ENV``): large tensors are
allocated and freed on every step, and without it each one faults in fresh pages.

Writes one JSON row per run to ``benchmarks/results/quantize_llm.jsonl``; with ``--resume``
the same command skips the runs it has already written there (a table longer than a sitting),
and with ``--table`` it prints the markdown table of those rows instead of running anything.

    .venv/bin/python benchmarks/quantize_llm.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from kompakt.compress.quantize import QuantizeConfig
from kompakt.eval import perplexity
from kompakt.runtime.bench import peak_rss_bytes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "quantize_llm.jsonl"
# run order: the 3-bit and 2.5-bit comparisons first
DEFAULT_RUNS = (
    "fp:0,jlcm:3,gptq:3,rtn:3,kmeans:3,jlcm:2.5,gptq:2.5,jlcm:2,gptq:2,"
    "jlcm:4,gptq:4,rtn:4,kmeans:4,rtn:2.5,kmeans:2.5,rtn:2,kmeans:2"
)

# glibc malloc keeps freed memory for reuse instead of returning each large tensor's pages
# to the OS and faulting fresh ones in on the next step (about a fifth of a JLCM model-phase
# step on 2 cores); every run, baselines too, gets the same environment
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
CHILD_ENV = {**os.environ, **MALLOC_ENV}


def prepare(work: Path, windows: int, calib: int) -> None:
    """The safetensors checkpoint and the token windows, made once."""
    from safetensors.torch import save_file

    from kompakt.data import wikitext2_windows
    from kompakt.models import load_smollm2

    ckpt = work / "checkpoint"
    if (work / "windows.safetensors").exists() and (ckpt / "config.json").exists():
        return
    model, tokenizer = load_smollm2()
    model.save_pretrained(str(ckpt))
    test = wikitext2_windows(tokenizer, "test", 512, windows)
    valid = wikitext2_windows(tokenizer, "valid", 512, calib)
    save_file({"test": test, "valid": valid}, str(work / "windows.safetensors"))


def one_run(work: Path, method: str, bits: float, args: argparse.Namespace) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import kompakt
    from kompakt.compress.quantize import decoded_weights, quantize_checkpoint

    windows = load_file(str(work / "windows.safetensors"))
    ckpt = work / "checkpoint"
    t0 = time.perf_counter()
    if method == "fp":
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
        size = (ckpt / "model.safetensors").stat().st_size
        metrics = {"bits_per_weight": 32.0}
    else:
        config = QuantizeConfig(
            method=method,
            bits=bits,
            block=args.block,
            rows_per_group=args.rows_per_group,
            steps=args.steps,
            block_epochs=args.block_epochs,
            block_lr=args.block_lr,
            block_map_lr=args.block_map_lr,
            block_norms=args.block_norms,
            model_epochs=args.model_epochs,
            model_lr=args.model_lr,
            model_map_lr=args.model_map_lr,
            block_windows=args.block_windows if method == "jlcm" else None,
            damp=args.damp,
        )
        model = quantize_checkpoint(ckpt, config, windows["valid"], progress=False)
        metrics = kompakt.artifact.record_of(model).steps[-1]["metrics"]
        out = work / "artifacts" / f"{method}-{bits}"
        kompakt.save(model, out, overwrite=True)
        size = (out / "model.safetensors").stat().st_size
    seconds = time.perf_counter() - t0
    peak_rss = peak_rss_bytes()
    with decoded_weights(model):  # decode once for the evaluation, not on every call
        ppl = perplexity(model, windows["test"])
    return {
        "method": method,
        "bits": bits,
        "bits_per_weight": round(metrics["bits_per_weight"], 3),
        "size_mb": round(size / 1e6, 2),
        "perplexity": round(ppl, 3),
        "compress_seconds": round(seconds, 1),
        # where a decoder run's time went (coding, moments, fp_stream, block_phase, model_phase)
        **{k: round(v, 1) for k, v in metrics.items() if k.endswith("_seconds")},
        "peak_rss_mb": round(peak_rss / 1e6, 1),
        "test_windows": len(windows["test"]),
        "calib_windows": len(windows["valid"]),
    }


LABELS = {
    "fp": "fp32",
    "jlcm": "JLCM",
    "gptq": "GPTQ g{block}",
    "rtn": "RTN g{block}",
    "kmeans": "k-means (per {rows_per_group} neurons)",
}


def number(x: float) -> str:
    """Perplexities and ratios from 1 to 1e8 in a table: two decimals, then thousands, then
    powers of ten."""
    if x < 1000:
        return f"{x:.2f}"
    return f"{x:,.0f}" if x < 1e5 else f"{x:.1e}".replace("e+0", "e").replace("e+", "e")


def table(rows: list[dict], runs: list[tuple[str, float]]) -> str:
    """The markdown table of ``rows``: fp, then the widest code bits first, each width's rows
    in the order of ``runs`` (those not written yet are left out); ``vs fp`` against the fp
    row."""
    by_run = {(r["method"], r["bits"]): r for r in rows}  # a run written again: its last row
    fp = by_run.get(("fp", 0.0))
    lines = [
        "| method | code bits | bits per weight | size (MB) | perplexity | vs fp | time (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(runs, key=lambda run: (run[0] != "fp", -run[1])):  # stable: runs' order
        r = by_run.get(run)
        if r is None:
            continue
        ratio = f"{number(r['perplexity'] / fp['perplexity'])}x" if fp else "-"
        if r["method"] == "fp":  # time and peak RSS are the quantization's; fp has none
            bits, cost = "32", "- | -"
        else:
            bits, cost = f"{r['bits']:g}", f"{r['compress_seconds']:.0f} | {r['peak_rss_mb']:.0f}"
        label = LABELS[r["method"]].format(**r)
        lines.append(
            f"| {label} | {bits} | {r['bits_per_weight']:.2f} | {r['size_mb']:.1f} | "
            f"{number(r['perplexity'])} | {ratio} | {cost} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", default=DEFAULT_RUNS, help="method:bits,... (fp:0 is the fp32 model)"
    )
    parser.add_argument("--windows", type=int, default=128, help="test windows for perplexity")
    parser.add_argument("--calib", type=int, default=16, help="valid windows for calibration")
    parser.add_argument("--block", type=int, default=128, help="rtn/gptq columns per scale")
    parser.add_argument(
        "--rows-per-group",
        type=int,
        default=QuantizeConfig.rows_per_group,
        help="jlcm/kmeans neurons per codebook",
    )
    parser.add_argument("--steps", type=int, default=60, help="jlcm steps per layer")
    parser.add_argument(
        "--block-epochs", type=int, default=QuantizeConfig.block_epochs, help="jlcm block phase"
    )
    parser.add_argument("--block-lr", type=float, default=QuantizeConfig.block_lr)
    parser.add_argument("--block-map-lr", type=float, default=QuantizeConfig.block_map_lr)
    parser.add_argument(
        "--block-norms",
        action=argparse.BooleanOptionalAction,
        default=QuantizeConfig.block_norms,
        help="jlcm block phase also learns the norm weights",
    )
    parser.add_argument(
        "--model-epochs", type=int, default=QuantizeConfig.model_epochs, help="jlcm model phase"
    )
    parser.add_argument("--model-lr", type=float, default=QuantizeConfig.model_lr)
    parser.add_argument("--model-map-lr", type=float, default=QuantizeConfig.model_map_lr)
    parser.add_argument(
        "--block-windows", type=int, help="jlcm: calibration windows of the per-block phases (all)"
    )
    parser.add_argument("--damp", type=float, help="gptq/jlcm damping (default: the method's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench" / "quantize_llm")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--resume", action="store_true", help="skip the runs this command already wrote to --out"
    )
    parser.add_argument(
        "--table", action="store_true", help="print the table of this command's rows in --out"
    )
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "BITS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        row = one_run(args.work, args.one[0], float(args.one[1]), args)
        print("ROW " + json.dumps(row))
        return
    command = "benchmarks/quantize_llm.py " + " ".join(
        a for a in sys.argv[1:] if a not in ("--resume", "--table")
    )
    runs = [(method, float(bits)) for method, bits in (r.split(":") for r in args.runs.split(","))]
    rows = []
    if args.out.exists():
        rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["command"] == command]
    if args.table:
        print(table(rows, runs))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work, args.windows, args.calib)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
        "command": command,
        "block": args.block,
        "rows_per_group": args.rows_per_group,
        "jlcm_steps": args.steps,
        "jlcm_block_epochs": args.block_epochs,
        "jlcm_block_lr": args.block_lr,
        "jlcm_block_map_lr": args.block_map_lr,
        "jlcm_block_norms": args.block_norms,
        "jlcm_model_epochs": args.model_epochs,
        "jlcm_model_lr": args.model_lr,
        "jlcm_model_map_lr": args.model_map_lr,
        "block_windows": args.block_windows,
        "damp": args.damp,
        "child_env": MALLOC_ENV,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    written = {(r["method"], r["bits"]) for r in rows} if args.resume else set()
    for method, bits in runs:
        if (method, bits) in written:
            print(f"{method}:{bits:g}: already in {args.out}", flush=True)
            continue
        # the child parses the same flags; --one makes it run this one method and width
        child = [sys.executable, __file__, *sys.argv[1:], "--one", method, str(bits)]
        child += ["--work", str(args.work.resolve())]
        done = subprocess.run(child, capture_output=True, text=True, cwd=ROOT, env=CHILD_ENV)
        printed = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or not printed:
            print(f"{method}:{bits:g}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        row = {**meta, **json.loads(printed[-1])}
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
