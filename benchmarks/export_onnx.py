"""onnxruntime: fp32 vs kompakt-pruned vs kompakt-JLCM vs onnxruntime's own quantizers.

For each model: file bytes, initializer bytes by dtype, peak RSS of a fresh process that
loads it and runs it (``kompakt bench``), latency p50 at two batch sizes, and for the CNN
the test top-1 of the exported model run in onnxruntime. onnxruntime's baselines quantize
the fp32 ONNX export of the same model: ``quantize_dynamic`` (int8 weights, QOperator) and
``MatMulNBitsQuantizer`` (4-bit blocks of 32, MatMul weights only), both on the export
after onnxruntime's basic optimizations (which fold the weight transposes into constants). The runtime floor is the
peak RSS of the same process running a one-node Identity model. Target (JLCM): peak RSS at
most 1.3 x (model bytes + floor). SmolLM2 is measured at batch 1 and 4 of 128 tokens, and
apart at batch 1 of 16 tokens (peak RSS with small activations). SmolLM2's pruned row is a
subnet with a fraction of OTO's prunable groups zeroed at random (no training on text): it
measures what pruning does to size and speed in onnxruntime, not to quality.

    .venv/bin/python benchmarks/export_onnx.py --cnn out/demo/dense,out/demo/pruned
    .venv/bin/python benchmarks/export_onnx.py --llm out/bench/quantize_llm/artifacts/jlcm-3.0
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import kompakt
from kompakt import export, runtime
from kompakt.compress import prune
from kompakt.compress.quantize import JLCMConfig, jlcm
from kompakt.export.onnx import initializer_bytes
from kompakt.runtime.bench import bench

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "export_onnx.jsonl"


def identity_model(path: Path) -> Path:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 1])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "empty", [x], [y]
    )
    onnx.save(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)]), str(path)
    )
    return path


def ort_baselines(fp32: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # onnxruntime's quantizers want constant weights: fold the exporter's weight transposes first
    folded = fp32.with_name(fp32.stem + "-folded.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    ort.InferenceSession(str(fp32), options, providers=["CPUExecutionProvider"])
    int8 = fp32.with_name(fp32.stem + "-ort-int8.onnx")
    quantize_dynamic(str(folded), str(int8), weight_type=QuantType.QInt8)
    nbits = fp32.with_name(fp32.stem + "-ort-matmulnbits4.onnx")
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(folded)), bits=4, block_size=32, is_symmetric=False
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(nbits), use_external_data_format=False)
    return {"ort quantize_dynamic int8": int8, "ort MatMulNBits 4-bit": nbits}


def top1(path: Path, images: torch.Tensor, labels: torch.Tensor) -> float:
    session = runtime.load(path)
    (name,) = [s.name for s in session.inputs]
    correct = 0
    for start in range(0, len(images), 500):
        out = session.run({name: images[start : start + 500].numpy()})
        correct += int(
            (np.argmax(next(iter(out.values())), 1) == labels[start : start + 500].numpy()).sum()
        )
    return correct / len(images)


def row(label: str, path: Path, batches: list[int], seq: int, floor: int, **extra) -> dict:
    measured = bench(path, batches, seq=seq, repeats=20)
    proto = onnx.load(str(path), load_external_data=False)
    size = measured["model_bytes"]
    result = {
        "model": label,
        "file_bytes": size,
        "initializer_bytes": initializer_bytes(proto) if path.suffix == ".onnx" else {},
        "peak_rss_mb": round(measured["peak_rss_bytes"] / 1e6, 1),
        "rss_over_bytes_plus_floor": round(measured["peak_rss_bytes"] / (size + floor), 3),
        **{f"p50_ms_b{r['batch']}": round(r["p50_ms"], 3) for r in measured["latency"]},
        **extra,
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cnn", help="comma-separated artifacts: the dense CNN first, then a pruned one"
    )
    parser.add_argument(
        "--llm", help="a JLCM-quantized SmolLM2 artifact (benchmarks/quantize_llm.py)"
    )
    parser.add_argument(
        "--llm-prune",
        type=float,
        default=0.3,
        help="fraction of SmolLM2's prunable groups the pruned row zeroes (at random)",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench" / "export_onnx")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    floor = bench(identity_model(args.work / "empty.onnx"), [1], repeats=5)["peak_rss_bytes"]
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "runtime_floor_mb": round(floor / 1e6, 1),
    }
    rows = []
    if args.cnn:
        from kompakt.data import fashion_mnist

        images, labels = fashion_mnist("test")
        dense_dir, *others = args.cnn.split(",")
        example = images[:2]
        models = {"fp32": kompakt.load(dense_dir)}
        for other in others:
            models[f"kompakt pruned ({other})"] = kompakt.load(other)
        calibration = list(fashion_mnist("train")[0][:512].split(128))
        for bits in (4, 2):
            models[f"kompakt JLCM {bits}-bit"] = jlcm(
                kompakt.load(dense_dir), JLCMConfig(bits=bits), calibration, progress=False
            )
        paths = {}
        for i, (label, model) in enumerate(models.items()):
            paths[label] = args.work / f"cnn-{i}.onnx"
            export.onnx(model, example, paths[label], overwrite=True)
        paths.update(ort_baselines(paths["fp32"]))
        for label, path in paths.items():
            rows.append(
                row(label, path, [1, 64], 0, floor, task="cnn", top1=top1(path, images, labels))
            )
    if args.llm:
        quantized = kompakt.load(args.llm)
        from transformers import AutoModelForCausalLM

        fp = AutoModelForCausalLM.from_pretrained(
            str(Path(args.llm).parent.parent / "checkpoint"), dtype=torch.float32
        ).eval()
        ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
        pruned_label = (
            f"kompakt pruned ({args.llm_prune:.0%} of the prunable groups zeroed at random, "
            "untrained: size and speed only)"
        )
        paths = {
            "fp32": args.work / "smollm2.onnx",
            pruned_label: args.work / "smollm2-pruned.onnx",
            f"kompakt JLCM ({Path(args.llm).name})": args.work / "smollm2-jlcm.onnx",
        }
        export.onnx(fp, ids, paths["fp32"], overwrite=True, tolerance=1e-3)
        # a structurally pruned subnet (OTO's groups; no DHSPG training on text here): the
        # zeroing is in place, so after the fp32 export. The subnet check allows 1e-4
        # relative: 30 layers of smaller matmuls sum in another order
        oto = prune.OTO(fp, {"input_ids": ids, "use_cache": False})
        oto.zero_groups(args.llm_prune, seed=0)
        subnet = oto.construct_subnet(atol=1e-4)
        export.onnx(subnet, ids, paths[pruned_label], overwrite=True, tolerance=1e-3)
        del oto, subnet
        export.onnx(
            quantized,
            ids,
            paths[f"kompakt JLCM ({Path(args.llm).name})"],
            overwrite=True,
            tolerance=1e-3,
        )
        paths.update(ort_baselines(paths["fp32"]))
        for label, path in paths.items():
            # also one short sequence alone: the weights' share of the peak, with activations
            # (the logits of 4 x 128 tokens alone are 100 MB) out of the way
            short = bench(path, [1], seq=16, repeats=5)["peak_rss_bytes"]
            size = path.stat().st_size
            extra = {
                "peak_rss_mb_b1_seq16": round(short / 1e6, 1),
                "rss_over_bytes_plus_floor_b1_seq16": round(short / (size + floor), 3),
            }
            rows.append(row(label, path, [1, 4], 128, floor, task="smollm2", **extra))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for r in rows:
            f.write(json.dumps({**meta, **r}) + "\n")


if __name__ == "__main__":
    main()
