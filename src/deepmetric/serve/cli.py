"""``deepmetric serve IDX``: run the search service (and ``python -m deepmetric.serve IDX``).

Wire it into the ``deepmetric`` command by appending :func:`register_commands` to
``deepmetric.cli._EXTENSIONS``.
"""
from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any, Sequence

from deepmetric.errors import ConfigError

__all__ = ["register_commands", "cmd_serve", "main"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    """Load and verify the index, then serve it with uvicorn until interrupted."""
    import uvicorn

    from deepmetric.serve.app import create_app

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535; got {args.port}")
    if args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be positive; got {args.max_upload_mb}")
    app = create_app(args.index, args.checkpoint, int(args.max_upload_mb * 1024 * 1024), device=args.device,
                     num_threads=args.threads)
    if not _is_loopback(args.host):
        print(f"deepmetric: warning: serving on {args.host}, reachable from other machines; the service has no "
              "authentication", file=sys.stderr)
    print(f"serving {args.index} on http://{args.host}:{args.port}/  (API docs: /docs; Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=not args.no_access_log)
    return 0


def register_commands(subparsers: Any) -> None:
    """Add ``serve`` to the ``deepmetric`` sub-command parser."""
    p = subparsers.add_parser("serve", help="serve an index: search API (/docs) and a web page (/)")
    p.add_argument("index", help="index directory (deepmetric index build)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--checkpoint", help="model for image queries (default: the one recorded in the index)")
    p.add_argument("--max-upload-mb", type=float, default=5.0, help="largest request body in MiB (413 above)")
    p.add_argument("--threads", type=int, help="torch/faiss threads (default: theirs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", action="store_true")
    p.set_defaults(func=cmd_serve)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m deepmetric.serve IDX [options]``, with the exit codes of the ``deepmetric`` command."""
    from deepmetric.errors import DeepMetricError

    parser = argparse.ArgumentParser(prog="python -m deepmetric.serve")
    sub = parser.add_subparsers(dest="command", required=True)
    register_commands(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"deepmetric: error: {exc}", file=sys.stderr)
        return 2
    except DeepMetricError as exc:
        print(f"deepmetric: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
