"""The `sparsekern` command: info, bench, prune, serve, dispatch.

Subcommands other than ``info`` live beside the code they drive: a module listed in
``_SUBCOMMANDS`` defines ``register(subparsers)``, which adds its parser and sets ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_SUBCOMMANDS = ("sparsekern.bench.cli", "sparsekern.prune.cli", "sparsekern.serve.cli", "sparsekern.dispatch_cli")


def _info(args: argparse.Namespace) -> int:
    from sparsekern.info import render

    print(render())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsekern", description="Sparse inference kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, backends found, compiled extension, CPU ISA, GPU")
    p.set_defaults(func=_info)
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
