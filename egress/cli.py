"""The ``egress`` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from egress import __version__, oplog
from egress.config import load_config, summarize
from egress.errors import EgressError
from egress.firewall.cli import add_firewall_commands


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when asked for or (with ``auto``) when installed; plain asyncio otherwise."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop  # noqa: PLC0415 - optional dependency
        except ImportError:
            if kind == "uvloop":
                raise EgressError("--loop uvloop: uvloop is not installed") from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_on_loop(kind: str, coro: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        runner.run(coro)


def _cmd_proxy(args: argparse.Namespace) -> int:
    from egress.runtime import serve  # noqa: PLC0415 - keep check-config free of asyncio deps

    config = load_config(args.config)
    oplog.configure(config.log.level)
    run_on_loop(args.loop, serve(Path(args.config)))
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    print(summarize(config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egress", description=__doc__)
    parser.add_argument("--version", action="version", version=f"egress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    proxy = sub.add_parser("proxy", help="run the egress proxy")
    proxy.add_argument("--config", required=True, help="TOML config file")
    proxy.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop (auto: uvloop when installed)",
    )
    proxy.set_defaults(handler=_cmd_proxy)

    check = sub.add_parser("check-config", help="validate a config file and print a summary")
    check.add_argument("file")
    check.set_defaults(handler=_cmd_check_config)
    add_firewall_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except EgressError as exc:
        print(f"egress: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
