"""``kompakt bench``: latency, throughput and peak memory of an exported model.

Each model is measured in a fresh process (so its peak RSS is its own): an ONNX model in a
Python process with onnxruntime; a TVM bundle for this host in the kompakt C++ runner, a
process holding the TVM runtime alone, one per batch size (peak RSS: the largest). For every
batch size the model runs ``warmup`` times and ``repeats`` timed times on random inputs built
from its input specs (dynamic axes: the first is the batch, the others take ``seq``).
Reported: latency p50 / p90 / p99 (ms), throughput (examples per second at the median), peak
RSS, and the model's bytes on disk.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kompakt.errors import KompaktError


def example_inputs(specs, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching the input ``specs``; token ids are drawn from 0..99."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        dims, dynamic_seen = [], 0
        for d in spec.shape:
            if isinstance(d, int):
                dims.append(d)
            else:
                dims.append(batch if dynamic_seen == 0 else seq)
                dynamic_seen += 1
        if np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.standard_normal(dims).astype(spec.dtype)
        else:
            feed[spec.name] = rng.integers(0, 100, dims).astype(spec.dtype)
    return feed


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def measure(
    path: str, batches: list[int], seq: int, warmup: int, repeats: int, threads: int | None
) -> dict:
    """Run in the current process (the child): latencies per batch and this process's peak RSS."""
    from kompakt.runtime import load

    start = time.perf_counter()
    session = load(path, threads)
    load_seconds = time.perf_counter() - start
    rows = []
    for batch in batches:
        feed = example_inputs(session.inputs, batch, seq)
        for _ in range(warmup):
            session.run(feed)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            session.run(feed)
            times.append((time.perf_counter() - t0) * 1000)
        rows.append(_latency(batch, times))
    return {
        "model": str(path),
        "model_bytes": model_bytes(Path(path)),
        "load_seconds": load_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "seq": seq,
        "latency": rows,
    }


def _latency(batch: int, times: list[float]) -> dict[str, float]:
    median = statistics.median(times)
    return {
        "batch": batch,
        "p50_ms": median,
        "p90_ms": _percentile(times, 90),
        "p99_ms": _percentile(times, 99),
        "throughput_per_s": batch / (median / 1000),
    }


def _bench_bundle(
    path: Path, batches: list[int], seq: int, warmup: int, repeats: int, threads: int | None
) -> dict[str, Any]:
    """A host TVM bundle in the kompakt C++ runner, a fresh process per batch size."""
    from kompakt.runtime import runner
    from kompakt.runtime.tvm import host_manifest, input_specs

    specs = input_specs(host_manifest(path))
    rows, peak = [], 0
    for batch in batches:
        feed = example_inputs(specs, batch, seq)
        _, timing = runner.run_bundle(
            path, feed, repeat=warmup + repeats, arch="host", threads=threads
        )
        rows.append(_latency(batch, timing["ms"][warmup:]))
        peak = max(peak, timing["peak_rss_bytes"])
    return {
        "model": str(path),
        "model_bytes": model_bytes(path),
        "peak_rss_bytes": peak,
        "seq": seq,
        "latency": rows,
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set size. On Linux ``VmHWM``, which starts afresh at exec
    (``ru_maxrss`` keeps the parent's peak across fork and exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_bytes(path: Path) -> int:
    """The model file plus any external-data files beside it that it names; for a TVM
    bundle directory, its library and parameters."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.name != "manifest.json")
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)


def bench(
    path: str | os.PathLike[str],
    batches: list[int] = (1, 64),
    seq: int = 128,
    warmup: int = 3,
    repeats: int = 30,
    threads: int | None = None,
) -> dict[str, Any]:
    """Measure ``path`` in a fresh process; returns the measurement as a dict."""
    if not Path(path).exists():
        raise KompaktError(f"{path}: no such model file or bundle")
    if Path(path).is_dir():
        return _bench_bundle(Path(path), list(batches), seq, warmup, repeats, threads)
    args = [
        sys.executable,
        "-m",
        "kompakt.runtime.bench",
        str(path),
        "--batches",
        *map(str, batches),
    ]
    args += ["--seq", str(seq), "--warmup", str(warmup), "--repeats", str(repeats)]
    if threads:
        args += ["--threads", str(threads)]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise KompaktError(f"{path}: benchmark failed ({lines[-1] if lines else done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(results: list[dict[str, Any]]) -> str:
    """One row per model and batch size."""
    header = ("model", "batch", "p50 ms", "p90 ms", "p99 ms", "per s", "peak RSS MB", "model MB")
    body = []
    for r in results:
        for row in r["latency"]:
            body.append(
                (
                    Path(r["model"]).name,
                    str(row["batch"]),
                    f"{row['p50_ms']:.3f}",
                    f"{row['p90_ms']:.3f}",
                    f"{row['p99_ms']:.3f}",
                    f"{row['throughput_per_s']:.0f}",
                    f"{r['peak_rss_bytes'] / 1e6:.1f}",
                    f"{r['model_bytes'] / 1e6:.3f}",
                )
            )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def _child() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int)
    a = parser.parse_args()
    print(json.dumps(measure(a.path, a.batches, a.seq, a.warmup, a.repeats, a.threads)))


if __name__ == "__main__":
    _child()
