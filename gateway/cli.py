"""`rkg`: the command line. Errors reach the user as `Type: message` and a non-zero exit."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from . import __version__, logs
from .config import add_serve_arguments, config_from_args
from .errors import GatewayError
from .kernels_cli import add_kernels_arguments, run_kernels_command
from .specs import add_spec_arguments, run_spec_command
from .users import add_token_arguments, run_token_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rkg", description="remote-kernel-gateway")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    add_serve_arguments(serve)
    add_spec_arguments(sub.add_parser("spec", help="add, list or remove kernelspecs"))
    add_token_arguments(sub.add_parser("token", help="add, list or remove users and their tokens"))
    add_kernels_arguments(
        sub.add_parser(
            "kernels", help="list the kernels of a running gateway; stop or interrupt one"
        )
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            from .app import serve

            config = config_from_args(args, os.environ)
            logs.setup(config)
            asyncio.run(serve(config))
        elif args.command == "spec":
            run_spec_command(args)
        elif args.command == "token":
            run_token_command(args, os.environ)
        elif args.command == "kernels":
            run_kernels_command(args, os.environ)
    except GatewayError as e:
        print(f"{type(e).__name__}: {e.message}", file=sys.stderr)
        return 2
    except OSError as e:  # the port is taken, the address does not exist, ...
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0
