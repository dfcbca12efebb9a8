"""The `sparsekern` command: info, bench, prune."""

from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    from sparsekern.info import render

    print(render())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsekern", description="Sparse inference kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, backends found, compiled extension, CPU ISA, GPU")
    p.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
