"""``sparsekern serve DIR``: serve a model folder over the OpenAI API (loopback unless told otherwise).

    sparsekern serve out/tinyllama-2of4 --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "tinyllama-2of4", "prompt": "Once upon a time", "max_tokens": 32}'
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a dense or pruned model folder over the OpenAI API")
    p.add_argument("folder", metavar="DIR", help="model folder (sparsekern.save, sparsekern prune or save_pretrained)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (default: as saved)")
    p.add_argument("--device", default="auto", help="'cpu', 'cuda', 'cuda:0' or 'auto' (default)")
    p.add_argument("--name", help="model name clients use (default: the folder's name)")
    p.add_argument("--concurrency", type=int, default=8, help="requests batched at once; more queue (default 8)")
    p.add_argument(
        "--no-dense-copies",
        dest="dense_copies",
        action="store_false",
        help="keep no dense weight copies for prefill (less memory, slower prefill where dense would win)",
    )
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach the Hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not 0 < args.port < 65536:
        print(f"sparsekern serve: --port: expected 1..65535, got {args.port}", file=sys.stderr)
        return 2
    if not _is_loopback(args.host):
        print(f"sparsekern serve: warning: listening on {args.host}: the API has no authentication", file=sys.stderr)
    import uvicorn

    from sparsekern.serve.app import build_app

    try:
        app = build_app(
            args.folder,
            name=args.name,
            device=args.device,
            dtype=args.dtype,
            concurrency=args.concurrency,
            dense_copies=args.dense_copies,
        )
    except (ValueError, OSError) as exc:
        print(f"sparsekern serve: {exc}", file=sys.stderr)
        return 2
    served = app.state.served
    print(f"sparsekern serve: {served.name!r} at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
