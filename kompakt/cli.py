"""The ``kompakt`` command. Each subcommand is a thin wrapper over a library call.

Errors from bad input print one line (``kompakt: error: ...``) and exit with status 2;
``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kompakt import __version__
from kompakt.errors import KompaktError


def _inspect(args: argparse.Namespace) -> int:
    from kompakt.summary import format_inspection, inspect_artifact

    print(format_inspection(inspect_artifact(args.artifact)))
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from kompakt.pipeline import run_pipeline

    run_pipeline(args.recipe, out=args.out)
    return 0


def _refuse_existing_out(args: argparse.Namespace) -> None:
    """Fail before any work if ``--out`` exists and ``--overwrite`` was not given."""
    if Path(args.out).exists() and not args.overwrite:
        raise KompaktError(f"{args.out}: already exists; pass --overwrite or choose another path")


def _compress_boost(args: argparse.Namespace) -> int:
    import kompakt
    from kompakt.compress import boost
    from kompakt.config import from_mapping
    from kompakt.data import fashion_mnist

    names = ("head", "units_per_step", "steps", "eta", "activation", "limit", "seed")
    fields = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    config = from_mapping(boost.BoostHeadConfig, fields, "kompakt compress boost")
    _refuse_existing_out(args)
    model = kompakt.load(args.artifact, trust_code=args.trust_code)
    metrics = boost.boost_classifier_head(
        model, fashion_mnist("train"), fashion_mnist("test"), config
    )
    path = kompakt.save(model, args.out, overwrite=args.overwrite)
    print(f"boost: {boost.describe(metrics, config.head)}")
    print(f"boost: saved {path}")
    return 0


def _compress_prune(args: argparse.Namespace) -> int:
    import kompakt
    from kompakt.compress.prune.classifier import PruneConfig, prune_classifier
    from kompakt.config import from_mapping
    from kompakt.data import fashion_mnist

    names = (
        "target_group_sparsity",
        "target_flops_reduction",
        "epochs",
        "start_epochs",
        "pruning_epochs",
        "pruning_periods",
        "lr",
        "mode",
        "seed",
    )
    fields = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    config = from_mapping(PruneConfig, fields, "kompakt compress prune")
    _refuse_existing_out(args)
    model = kompakt.load(args.artifact, trust_code=args.trust_code)
    images, labels = fashion_mnist("train")
    subnet, m = prune_classifier(
        model, images[: args.limit], labels[: args.limit], config, test=fashion_mnist("test")
    )
    path = kompakt.save(subnet, args.out, overwrite=args.overwrite)
    print(
        f"prune: FLOPs {m['flops_before']:,} -> {m['flops_after']:,}, parameters {m['params_before']:,} -> "
        f"{m['params_after']:,}, test accuracy {m['test_accuracy_before']:.2%} -> {m['test_accuracy']:.2%}"
    )
    print(f"prune: saved {path}")
    return 0


def _compress_quantize(args: argparse.Namespace) -> int:
    import kompakt
    from kompakt.compress import quantize
    from kompakt.config import from_mapping

    names = (
        "method",
        "bits",
        "codebook",
        "rows_per_group",
        "block",
        "steps",
        "block_epochs",
        "block_lr",
        "block_map_lr",
        "block_norms",
        "model_epochs",
        "model_lr",
        "model_map_lr",
        "block_windows",
        "damp",
        "skip",
    )
    fields = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    config = from_mapping(quantize.QuantizeConfig, fields, "kompakt compress quantize")
    _refuse_existing_out(args)
    source = Path(args.source)
    if (source / "config.json").exists() and not (source / kompakt.artifact.MANIFEST_FILE).exists():
        tokens = _wikitext_calibration(args.tokenizer or source, args.calib or 16)
        model = quantize.quantize_checkpoint(source, config, tokens, work_dir=args.work_dir)
    else:
        model = kompakt.load(source, trust_code=args.trust_code)
        if quantize.is_decoder_lm(model):
            if args.tokenizer is None:
                raise KompaktError(
                    f"{source}: a language model artifact carries no tokenizer; pass --tokenizer "
                    "FOLDER for the WikiText-2 calibration windows"
                )
            calibration = _wikitext_calibration(args.tokenizer, args.calib or 16)
        else:
            from kompakt.data import fashion_mnist

            calibration = list(fashion_mnist("train")[0][: args.calib or 512].split(128))
        quantize.quantize(model, config, calibration, work_dir=args.work_dir)
    path = kompakt.save(model, args.out, overwrite=args.overwrite)
    m = kompakt.artifact.record_of(model).steps[-1]["metrics"]
    print(
        f"quantize: {config.method} {m['coded_layers']} layers, {m['bits_per_weight']:.3f} bits per "
        f"weight ({m['coded_weight_bytes']:,} bytes of coded weights) in {m['seconds']:.0f} s"
    )
    print(f"quantize: saved {path}")
    return 0


def _wikitext_calibration(tokenizer_folder, windows: int):
    from transformers import AutoTokenizer

    from kompakt.data import wikitext2_windows

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    except (OSError, ValueError) as e:
        raise KompaktError(
            f"{tokenizer_folder}: no tokenizer found ({e}); pass --tokenizer with a folder "
            "written by tokenizer.save_pretrained"
        ) from e
    return wikitext2_windows(tokenizer, "valid", 512, windows)


def _example_input(args: argparse.Namespace, model):
    """``--input-shape``, token ids for a language model, or the inputs the artifact
    records (a registered architecture declares them; a compression step notes them)."""
    import torch

    import kompakt

    generator = torch.Generator().manual_seed(0)
    if args.input_shape:
        shape = [int(d) for d in args.input_shape.split(",")]
        return torch.randn(shape)
    if hasattr(model, "lm_head"):
        vocab = model.config.vocab_size
        return torch.randint(0, vocab, (2, args.seq), generator=generator)
    specs = kompakt.artifact.record_of(model).inputs
    if (
        len(specs) == 1
        and specs[0]["dtype"].startswith("float")
        and None not in specs[0]["shape"][1:]
    ):
        return torch.randn([2, *specs[0]["shape"][1:]], generator=generator)
    known = f"it records {specs}" if specs else "it records no input"
    raise KompaktError(
        f"{args.artifact}: kompakt cannot make this model's example input ({known}); pass "
        "--input-shape, e.g. 2,3,224,224"
    )


def _print_validation(validation: dict) -> None:
    if "skipped" in validation:
        print(f"export: not validated: {validation['skipped']}")
    for case in validation.get("cases", []):
        print(
            f"export: shapes {case['shapes']}: max abs error {case['max_abs_error']:.3g}, "
            f"relative {case['max_rel_error']:.3g}"
        )


def _export_onnx(args: argparse.Namespace) -> int:
    import json

    import kompakt
    from kompakt import export

    model = kompakt.load(args.artifact, trust_code=args.trust_code)
    example = _example_input(args, model)
    report = export.onnx(
        model,
        example,
        args.out,
        tolerance=args.tolerance,
        mobile=args.mobile,
        overwrite=args.overwrite,
    )
    sizes = ", ".join(f"{k} {v:,}" for k, v in sorted(report["initializer_bytes"].items()))
    print(f"export: {report['path']} ({report['file_bytes']:,} bytes; initializers: {sizes})")
    if report["codebook_layers"]:
        print(
            f"export: {report['codebook_layers']} codebook layers kept as packed codes "
            "(onnxruntime constant folding disabled for this model)"
        )
    _print_validation(report["validation"])
    if args.mobile:
        print(f"export: {report['ort_path']} and {report['required_operators']}")
    Path(str(args.out) + ".json").write_text(json.dumps(report, indent=1))
    return 0


def _export_tvm(args: argparse.Namespace) -> int:
    import kompakt
    from kompakt import export

    model = kompakt.load(args.artifact, trust_code=args.trust_code)
    report = export.tvm(
        model,
        _example_input(args, model),
        args.out,
        target=args.target_name,
        tolerance=args.tolerance,
        tune=args.tune,
        tune_dir=args.tune_dir,
        overwrite=args.overwrite,
    )
    sizes = ", ".join(f"{k} {v:,}" for k, v in sorted(report["params"]["bytes_by_dtype"].items()))
    print(
        f"export: {report['path']} for {report['target']['name']} "
        f"({report['library']}, compiled in {report['compile_seconds']:.1f} s; parameters: {sizes})"
    )
    if report["codebook_layers"]:
        print(f"export: {report['codebook_layers']} codebook layers run as fused decode kernels")
    _print_validation(report["validation"])
    return 0


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from kompakt import runtime

    session = runtime.load(args.model)
    inputs = {}
    for item in args.input:
        name, _, file = item.partition("=")
        if not file:
            raise KompaktError(f"--input {item!r}: write NAME=FILE.npy")
        try:
            inputs[name] = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise KompaktError(f"--input {item!r}: cannot read {file} as .npy ({e})") from e
    outputs = session.run(inputs)
    for name, value in outputs.items():
        print(f"{name}: {value.dtype}{list(value.shape)}")
    if args.out:
        np.savez(args.out, **outputs)
        print(f"run: saved {args.out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json

    from kompakt.runtime.bench import bench, format_table

    results = [
        bench(p, args.batch, args.seq, repeats=args.repeats, threads=args.threads)
        for p in args.models
    ]
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kompakt", description="Compress trained PyTorch models and ship them to devices."
    )
    parser.add_argument("--version", action="version", version=f"kompakt {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback on errors",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "inspect", parents=[common], help="layers, encodings and sizes of an artifact"
    )
    p.add_argument("artifact", help="artifact directory (holds kompakt.json and model.safetensors)")
    p.set_defaults(func=_inspect)

    p = commands.add_parser(
        "pipeline", parents=[common], help="run a recipe of stages (default: the built-in demo)"
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML file (default: built-in demo.yaml)")
    p.add_argument("--out", help="output folder (overrides the recipe's 'out')")
    p.set_defaults(func=_pipeline)

    trusting = argparse.ArgumentParser(add_help=False)
    trusting.add_argument(
        "--trust-code",
        action="store_true",
        help="import the model factory the artifact names, if it was saved with one (runs that "
        "code: only for artifacts you trust)",
    )
    artifact_io = argparse.ArgumentParser(add_help=False, parents=[trusting])
    artifact_io.add_argument(
        "artifact", help="artifact directory of a trained Fashion-MNIST classifier"
    )
    artifact_io.add_argument("--out", required=True, help="artifact directory to write")
    artifact_io.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p = commands.add_parser("compress", parents=[common], help="compress a saved model")
    methods = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    p = methods.add_parser(
        "boost",
        parents=[common, artifact_io],
        help="replace a Fashion-MNIST classifier's head by a GBNN head fitted on its features",
    )
    p.add_argument("--head", help="dotted name of the head module (default: fc)")
    p.add_argument("--units-per-step", type=int, help="hidden units per boosting step (default: 8)")
    p.add_argument("--steps", type=int, help="boosting steps (default: 32)")
    p.add_argument("--eta", type=float, help="shrinkage (default: 0.5)")
    p.add_argument("--activation", help="sigmoid, tanh or relu (default: sigmoid)")
    p.add_argument("--limit", type=int, help="fit on the first N training images (default: all)")
    p.add_argument("--seed", type=int, help="seed (default: 0)")
    p.set_defaults(func=_compress_boost)

    p = methods.add_parser(
        "prune",
        parents=[common, artifact_io],
        help="prune a Fashion-MNIST classifier with OTOv3 (DHSPG channels or H2SPG branches)",
    )
    p.add_argument(
        "--sparsity",
        dest="target_group_sparsity",
        type=float,
        help="fraction of groups to remove (default: 0.5)",
    )
    p.add_argument(
        "--flops-reduction",
        dest="target_flops_reduction",
        type=float,
        help="share of FLOPs to remove instead of a fraction of groups (e.g. 0.7)",
    )
    p.add_argument(
        "--mode",
        choices=("prune", "erase"),
        help="prune channel groups or erase residual branches (default: prune)",
    )
    p.add_argument(
        "--epochs", type=int, help="training epochs with the pruning optimizer (default: 2)"
    )
    p.add_argument(
        "--start-epochs", type=float, help="epochs before the groups are split (default: 0.1)"
    )
    p.add_argument(
        "--pruning-epochs", type=float, help="epochs to drive redundant groups to zero (default: 1)"
    )
    p.add_argument(
        "--pruning-periods",
        type=int,
        help="splits over the pruning window, each adding its share of the target (default: 1)",
    )
    p.add_argument("--lr", type=float, help="learning rate (default: 0.05)")
    p.add_argument("--seed", type=int, help="seed (default: 0)")
    p.add_argument("--limit", type=int, help="train on the first N training images (default: all)")
    p.set_defaults(func=_compress_prune)

    p = methods.add_parser(
        "quantize",
        parents=[common, trusting],
        help="quantize a model's Linear / Conv2d / Embedding layers (JLCM, GPTQ, RTN, k-means)",
    )
    p.add_argument(
        "source",
        help="a kompakt artifact, or a transformers checkpoint folder (config.json + "
        "safetensors) streamed one block at a time",
    )
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--method", choices=("jlcm", "gptq", "rtn", "kmeans"), help="(default: jlcm)")
    p.add_argument(
        "--bits", type=float, help="average code bits per weight, e.g. 3 or 2.5 (default: 3)"
    )
    p.add_argument(
        "--codebook", choices=("group", "tensor"), help="jlcm/kmeans codebooks (default: group)"
    )
    p.add_argument("--rows-per-group", type=int, help="jlcm/kmeans neurons per group (default: 8)")
    p.add_argument("--block", type=int, help="rtn/gptq columns per scale (default: 128)")
    p.add_argument("--steps", type=int, help="jlcm joint-learning steps per layer (default: 100)")
    p.add_argument(
        "--block-epochs",
        type=int,
        help="jlcm, language models: epochs of the block phase (codebooks learned on each "
        "block's output and the head's logits; default: 4; 0 skips it)",
    )
    p.add_argument("--block-lr", type=float, help="jlcm block phase learning rate (default: 0.001)")
    p.add_argument(
        "--block-map-lr",
        type=float,
        help="jlcm block phase: step of the mappings' latent weights, a fraction of each "
        "layer's weight spread (default: 0, the codes stay)",
    )
    p.add_argument(
        "--block-norms",
        action=argparse.BooleanOptionalAction,
        help="jlcm block phase: also learn the norm weights (default: on)",
    )
    p.add_argument(
        "--model-epochs",
        type=int,
        help="jlcm, language models: epochs of the model phase (all codebooks learned on the "
        "model's logits, one block in memory at a time; default: 4; 0 skips it)",
    )
    p.add_argument("--model-lr", type=float, help="jlcm model phase learning rate (default: 3e-4)")
    p.add_argument(
        "--model-map-lr",
        type=float,
        help="jlcm model phase: step of the mappings' latent weights, as --block-map-lr "
        "(default: 0, the codes stay)",
    )
    p.add_argument(
        "--block-windows",
        type=int,
        help="language models: calibrate the per-block phases on the first N windows only, "
        "the jlcm model phase on all of them (default: all)",
    )
    p.add_argument(
        "--damp",
        type=float,
        help="gptq/jlcm damping of the input moments, a fraction of their mean diagonal "
        "(default: 0.01 for gptq, 0.2 for jlcm)",
    )
    p.add_argument("--skip", nargs="+", help="module names or patterns to keep dense")
    p.add_argument(
        "--calib",
        type=int,
        help="calibration: WikiText-2 valid 512-token windows for language models (default: 16), "
        "Fashion-MNIST training images otherwise (default: 512)",
    )
    p.add_argument(
        "--tokenizer", help="tokenizer folder (language models; default: the checkpoint)"
    )
    p.add_argument(
        "--work-dir", help="language models: keep finished blocks here and resume from them"
    )
    p.set_defaults(func=_compress_quantize)

    p = commands.add_parser("export", parents=[common], help="export a saved model for a runtime")
    targets = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    p = targets.add_parser(
        "onnx", parents=[common, trusting], help="ONNX for onnxruntime, validated against torch"
    )
    p.add_argument("artifact", help="kompakt artifact directory")
    p.add_argument(
        "--out", required=True, help="the .onnx file to write (a report goes to OUT.json)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--input-shape", help="example input shape, e.g. 2,1,28,28 (default: known models)"
    )
    p.add_argument("--seq", type=int, default=16, help="language models: traced sequence length")
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest relative error accepted (default: 1e-4)",
    )
    p.add_argument(
        "--mobile", action="store_true", help="also write .ort and required_operators.config"
    )
    p.set_defaults(func=_export_onnx)

    p = targets.add_parser(
        "tvm",
        parents=[common, trusting],
        help="an Apache TVM bundle for the host, arm64 Linux or Android",
    )
    p.add_argument("artifact", help="kompakt artifact directory")
    p.add_argument("--out", required=True, help="the bundle directory to write")
    p.add_argument(
        "--target",
        dest="target_name",
        default="host",
        help="host, aarch64-linux-gnu, aarch64-linux-android, or a TVM JSON target",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--input-shape", help="example input shape, e.g. 2,1,28,28 (default: known models)"
    )
    p.add_argument("--seq", type=int, default=16, help="language models: traced sequence length")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest relative error accepted")
    p.add_argument(
        "--tune",
        type=int,
        default=0,
        metavar="TRIALS",
        help="MetaSchedule tuning trials per fused operator (static shapes; default 0: untuned, fast)",
    )
    p.add_argument(
        "--tune-dir", help="tuning database directory, reused across runs (default: OUT-tuning)"
    )
    p.set_defaults(func=_export_tvm)

    p = commands.add_parser("run", parents=[common], help="run an exported model on .npy inputs")
    p.add_argument("model", help=".onnx or .ort file, or a TVM bundle directory")
    p.add_argument("--input", nargs="+", default=[], metavar="NAME=FILE.npy", help="model inputs")
    p.add_argument("--out", help="write the outputs to this .npz file")
    p.set_defaults(func=_run)

    p = commands.add_parser(
        "bench", parents=[common], help="latency, throughput and peak RSS of exported models"
    )
    p.add_argument("models", nargs="+", help=".onnx or .ort files, or TVM bundle directories")
    p.add_argument(
        "--batch", type=int, nargs="+", default=[1, 64], help="batch sizes (default: 1 64)"
    )
    p.add_argument("--seq", type=int, default=128, help="sequence length for token inputs")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per batch size")
    p.add_argument("--threads", type=int, help="runtime threads (default: all)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KompaktError as e:
        if args.debug:
            raise
        print(f"kompakt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kompakt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
