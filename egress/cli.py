"""egress: a network egress proxy and firewall controller for multi-tenant app hosting.

Exit codes: 0 success, 1 a check that found a problem (firewall status), 2 a bad config or a
failed start, 130 interrupted. ``egress rules`` has its own table (``egress rules --help``):
3 no such app, 4 a conflict, 5 the store is unavailable. Every ``--config`` defaults to
/etc/egress/egress.toml.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from egress import __version__, oplog
from egress.config import DEFAULT_CONFIG_PATH, load_config, summarize
from egress.config.lint import warnings_for
from egress.errors import ConfigError, EgressError
from egress.firewall.cli import add_firewall_commands
from egress.gcpolicy import full_collections_deferred
from egress.rules_cli import add_rules_commands
from egress.sandbox_cli import add_sandbox_command


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


def loop_name(kind: str) -> str:
    """The event loop ``kind`` resolves to: "uvloop" or "asyncio"."""
    return "uvloop" if loop_factory(kind) is not asyncio.new_event_loop else "asyncio"


def run_on_loop(kind: str, coro: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        runner.run(coro)


def _cmd_proxy(args: argparse.Namespace) -> int:
    """The daemon speaks JSON lines on stderr from its first word: a failed start is one error
    line (every config problem in it), and the exit status is 2."""
    from egress.runtime import serve  # noqa: PLC0415 - keep check-config free of asyncio deps

    oplog.configure("info")
    log = logging.getLogger("egress")
    try:
        with full_collections_deferred():  # a big [[app]] list loads ~15% faster
            config = load_config(args.config)
        oplog.set_level(config.log.level)
        for warning in warnings_for(config):
            log.warning("config warning", extra={"warning": warning})
        run_on_loop(args.loop, serve(config, loop_name=loop_name(args.loop)))
    except ConfigError as exc:
        log.error(
            "cannot start: bad config",
            extra={"config": args.config, "problems": [str(p) for p in exc.problems]},
        )
        return 2
    except EgressError as exc:
        log.error("cannot start", extra={"config": args.config, "error": str(exc)})
        return 2
    except Exception as exc:  # a bug, still said in one JSON line
        log.exception("proxy failed", extra={"config": args.config, "error": repr(exc)[:300]})
        return 2
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config or args.file or DEFAULT_CONFIG_PATH)
    print(summarize(config))
    warnings = warnings_for(config)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if warnings:
        print(
            f"{len(warnings)} warning(s); the config is valid (exit 0). Errors exit 2.",
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egress",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"egress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    proxy = sub.add_parser("proxy", help="run the egress proxy")
    proxy.add_argument(
        "--config",
        default=DEFAULT_CONFIG_PATH,
        help=f"TOML config file (default: {DEFAULT_CONFIG_PATH})",
    )
    proxy.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop (auto: uvloop when installed)",
    )
    proxy.set_defaults(handler=_cmd_proxy)

    check = sub.add_parser(
        "check-config",
        help="validate a config file, print a summary and warnings (exit 0), errors (exit 2)",
    )
    check.add_argument("--config", help=f"TOML config file (default: {DEFAULT_CONFIG_PATH})")
    check.add_argument("file", nargs="?", help="the same, positionally")
    check.set_defaults(handler=_cmd_check_config)
    add_firewall_commands(sub)
    add_rules_commands(sub)
    add_sandbox_command(sub)
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
