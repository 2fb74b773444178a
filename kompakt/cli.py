"""The ``kompakt`` command. Each subcommand is a thin wrapper over a library call.

Errors from bad input print one line (``kompakt: error: ...``) and exit with status 2;
``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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
