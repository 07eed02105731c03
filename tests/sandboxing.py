"""Apps under the socket shim, as a runtime node runs them: a real interpreter under a test
uid, with the shim installed at start by ``sitecustomize`` and real client libraries.

The project's own interpreter may live where test uids cannot read it (pyenv under /root), so
the app interpreter is a virtualenv built once per run from the system's ``python3``, holding
the client libraries the tests use at the versions this environment has (uv installs them
from its cache). The shim is copied to a world-readable directory for the same reason: the
checkout itself may be private.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.privilege import require
from tests.processes import REPO

SHIM_SOURCE = REPO / "egress" / "sandbox"
APP_LIBRARIES = ("requests", "aiohttp", "redis", "uvloop")
SYSTEM_PYTHON = "/usr/bin/python3"
_BOOTSTRAP_UV = "egress-bootstrap/bin/uv"  # where scripts/bootstrap.sh installs uv


def uv_path() -> str:
    for candidate in (
        os.environ.get("UV"),
        shutil.which("uv"),
        str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / _BOOTSTRAP_UV),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    raise AssertionError("uv not found: run the suite through scripts/test (it installs uv)")


@functools.cache
def app_python() -> str:
    """A Python interpreter every test uid can run, with the client libraries installed."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in APP_LIBRARIES]
    base = SYSTEM_PYTHON if Path(SYSTEM_PYTHON).exists() else sys.executable
    key = hashlib.sha256("\0".join((base, *pins)).encode()).hexdigest()[:12]
    home = Path(tempfile.gettempdir()) / f"egress-appenv-{key}"  # reused by later runs
    python = home / "bin" / "python"
    if not python.exists():
        uv = uv_path()
        subprocess.run([uv, "venv", "-q", "--python", base, str(home)], check=True, timeout=300)
        subprocess.run(
            [uv, "pip", "install", "-q", "--python", str(python), *pins], check=True, timeout=600
        )
    subprocess.run(["chmod", "-R", "a+rX", str(home)], check=True)
    return str(python)


@functools.cache
def shim_dir() -> Path:
    """A world-readable copy of ``egress/sandbox`` (fresh per run, removed when it ends); its
    ``boot`` goes first on PYTHONPATH, exactly as ``egress sandbox`` puts the original's."""
    root = Path(tempfile.mkdtemp(prefix="egress-shim-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    target = root / "sandbox"
    shutil.copytree(SHIM_SOURCE, target, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    return target


def world_readable_dir() -> Path:
    """A fresh directory test uids can read, for their scripts (removed by the caller)."""
    path = Path(tempfile.mkdtemp(prefix="egress-app-"))
    path.chmod(0o755)
    return path


def shim_environment(
    proxy: tuple[str, int], *, listen: str | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment ``egress sandbox --proxy HOST:PORT`` gives a program."""
    host, port = proxy
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/",
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(shim_dir() / "boot"),
        "EGRESS_SANDBOX_PROXY": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
    }
    if listen is not None:
        env["EGRESS_SANDBOX_LISTEN"] = listen
    env.update(extra or {})
    return env


def run_app(
    code: str,
    *,
    uid: int,
    proxy: tuple[str, int],
    args: Sequence[str] = (),
    listen: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    python: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (a script's text) as ``uid`` under the shim, to completion; output captured.

    The script runs from a directory of its own, so it imports nothing from the checkout.
    """
    require("root", f"an app under uid {uid}")
    workdir = world_readable_dir()
    try:
        script = workdir / "app.py"
        script.write_text(code)
        script.chmod(0o644)
        options: dict[str, Any] = {
            "user": uid,
            "group": uid,
            "extra_groups": [],
            "cwd": str(workdir),
            "env": shim_environment(proxy, listen=listen, extra=env),
            "capture_output": True,
            "text": True,
            "timeout": timeout,
            "check": False,
        }
        return subprocess.run([python or app_python(), str(script), *args], **options)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
