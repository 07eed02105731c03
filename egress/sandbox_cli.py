"""``egress sandbox``: run a program with the socket shim, or install the shim into an image.

The program is exec'd (it replaces this process, so signals and the exit status are its own)
with the shim's ``boot/`` directory first on ``PYTHONPATH`` and the ``EGRESS_SANDBOX_*``
settings in its environment; Python children it starts inherit both. The settings come from
the flags, else from ``[sandbox]`` and ``proxy.socks5_listen`` of ``--config``, else from the
environment already set. With neither ``--proxy``, ``EGRESS_SANDBOX_PROXY`` nor ``--config``,
the config is /etc/egress/egress.toml.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from egress.config import DEFAULT_CONFIG_PATH, load_config
from egress.config.model import Config
from egress.errors import EgressError
from egress.sandbox.settings import (
    ENV_LISTEN,
    ENV_PROXY,
    ENV_TIMEOUT,
    LISTEN_POLICIES,
    SandboxConfigError,
    Settings,
)

__all__ = ["add_sandbox_command", "sandbox_environment"]

PACKAGE_DIR = Path(__file__).resolve().parent / "sandbox"
BOOT_DIR = PACKAGE_DIR / "boot"
HOOK_NAME = "egress_sandbox"


def proxy_from_config(config: Config) -> str:
    if config.sandbox.proxy is not None:
        return str(config.sandbox.proxy)
    for address in config.proxy.socks5_listen:
        host = ip_address(address.host)
        if host.is_unspecified:  # listening everywhere: loopback included
            host = ip_address("127.0.0.1" if host.version == 4 else "::1")
        if address.port and host.is_loopback:
            return f"[{host}]:{address.port}" if host.version == 6 else f"{host}:{address.port}"
    raise EgressError(
        f"{config.source}: no sandbox.proxy and no loopback proxy.socks5_listen with a fixed"
        " port: the shim needs the proxy's SOCKS5 address (or give --proxy)"
    )


def sandbox_environment(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    """The environment of the sandboxed program; settings checked here, so a mistake stops
    before the program starts rather than inside it."""
    env = dict(environ)
    path = args.config
    if path is None and not args.proxy and not env.get(ENV_PROXY):
        if not Path(DEFAULT_CONFIG_PATH).exists():  # say what to give, not only what is missing
            raise EgressError(
                "sandbox: give the proxy: --proxy 127.0.0.1:1080, or --config FILE"
                f" (the default {DEFAULT_CONFIG_PATH} does not exist)"
            )
        path = DEFAULT_CONFIG_PATH  # only when nothing else names the proxy
    config = load_config(path) if path else None
    if args.proxy:
        env[ENV_PROXY] = args.proxy
    elif config is not None:
        env[ENV_PROXY] = proxy_from_config(config)
    if args.listen:
        env[ENV_LISTEN] = args.listen
    elif config is not None:
        env[ENV_LISTEN] = config.sandbox.listen.value
    if args.timeout is not None:
        env[ENV_TIMEOUT] = str(args.timeout)
    if not env.get(ENV_PROXY):
        raise EgressError("sandbox: give the proxy: --proxy 127.0.0.1:1080, or --config FILE")
    try:
        Settings.from_environ(env)
    except SandboxConfigError as exc:
        given = "--proxy" if args.proxy and ENV_PROXY in str(exc) else None
        given = given or ("--listen" if args.listen and ENV_LISTEN in str(exc) else None)
        given = given or (
            "--timeout" if args.timeout is not None and ENV_TIMEOUT in str(exc) else None
        )
        raise EgressError(f"sandbox: {given + ': ' if given else ''}{exc}") from None
    return env


def unreadable_by_others(package: Path) -> Path | None:
    """The first file of the shim under ``package`` (or directory on the way to it) that other
    users cannot read (or enter): Python would skip the shim, or fail inside it, silently."""
    for directory in (package, *package.parents):
        if not directory.stat().st_mode & stat.S_IXOTH:
            return directory
    for path in sorted(package.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        needed = stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0)
        if path.stat().st_mode & needed != needed:
            return path
    return None


def install_hook(site_dir: Path) -> Path:
    """Copy the shim into ``site_dir`` as ``egress_sandbox`` with a ``.pth`` that installs it
    in every interpreter using that site directory."""
    if not site_dir.is_dir():
        raise EgressError(f"sandbox --install-hook: {site_dir} is not a directory")
    owner = site_dir.stat()
    if owner.st_uid != os.geteuid() or owner.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        # Someone else could plant links there that this (root) process would write through.
        raise EgressError(
            f"sandbox --install-hook: {site_dir} is owned by uid {owner.st_uid} or writable by"
            f" others (mode {stat.filemode(owner.st_mode)}): install as its owner into a"
            " directory only its owner can write"
        )
    target = site_dir / HOOK_NAME
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(PACKAGE_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "boot"))
    pth = site_dir / f"{HOOK_NAME}.pth"
    pth.write_text(f"import {HOOK_NAME}.auto\n")
    # Every interpreter of the image must read it, whatever the umask or the source's modes.
    for path in (pth, target, *target.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    hidden = unreadable_by_others(target)
    if hidden is not None:
        raise EgressError(
            f"sandbox --install-hook: {hidden} is not readable by other users, so apps would"
            " run without the shim; make the site directory readable (chmod o+rx)"
        )
    return pth


def _cmd_sandbox(args: argparse.Namespace) -> int:
    if args.install_hook:
        pth = install_hook(Path(args.install_hook))
        print(f"installed {pth.parent / HOOK_NAME} and {pth}; set {ENV_PROXY} for its programs")
        return 0
    command: list[str] = args.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise EgressError("sandbox: give the program to run after --, e.g. -- python app.py")
    env = sandbox_environment(args, dict(os.environ))
    hidden = unreadable_by_others(PACKAGE_DIR)
    if hidden is not None:
        print(
            f"egress: sandbox: warning: {hidden} is not readable by other users: a program"
            " that runs as another uid starts WITHOUT the shim (Python skips a sitecustomize"
            " it cannot read, silently); install egress where every uid can read it, or use"
            " --install-hook",
            file=sys.stderr,
        )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BOOT_DIR), env.get("PYTHONPATH")]))
    try:
        os.execvpe(command[0], command, env)  # noqa: S606 - the operator's own command line
    except OSError as exc:
        print(f"egress: sandbox: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
    return 127


def add_sandbox_command(sub: Any) -> None:
    sandbox = sub.add_parser(
        "sandbox",
        help="run a Python program with the socket shim (or install the shim into an image)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sandbox.add_argument(
        "--config",
        help="take the proxy address and [sandbox] from this file (default, when neither"
        f" --proxy nor {ENV_PROXY} is given: {DEFAULT_CONFIG_PATH})",
    )
    sandbox.add_argument("--proxy", help="the proxy's loopback SOCKS5 HOST:PORT")
    sandbox.add_argument("--listen", choices=LISTEN_POLICIES, help="what bind()/listen() may do")
    sandbox.add_argument("--timeout", type=float, help="seconds a connect waits for the proxy")
    sandbox.add_argument(
        "--install-hook",
        metavar="SITE_PACKAGES",
        help="copy the shim into this site-packages with a .pth hook, and exit",
    )
    sandbox.add_argument("command", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS...]")
    sandbox.set_defaults(handler=_cmd_sandbox)
