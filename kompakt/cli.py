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
    model = kompakt.load(args.artifact)
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
        "epochs",
        "start_epochs",
        "pruning_epochs",
        "lr",
        "mode",
        "seed",
    )
    fields = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    config = from_mapping(PruneConfig, fields, "kompakt compress prune")
    _refuse_existing_out(args)
    model = kompakt.load(args.artifact)
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

    artifact_io = argparse.ArgumentParser(add_help=False)
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
    p.add_argument("--lr", type=float, help="learning rate (default: 0.05)")
    p.add_argument("--seed", type=int, help="seed (default: 0)")
    p.add_argument("--limit", type=int, help="train on the first N training images (default: all)")
    p.set_defaults(func=_compress_prune)
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
