"""The wheel as an operator installs it: ``uv build --wheel``, a fresh virtualenv, ``uv pip
install 'egress-*.whl[uvloop,firewall]'``, then only that virtualenv's ``egress``.

Every other test imports egress from the checkout, so a packaging mistake (a module or the
shim's boot file left out of the wheel, a broken entry point or extra, lost license metadata)
would pass them all and fail on the first node. Here the commands run with a minimal
environment from a directory outside the checkout, so nothing but the installed wheel can be
imported.
"""

from __future__ import annotations

import asyncio
import email.parser
import json
import os
import signal
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from egress.config import DEFAULT_CONFIG_PATH
from tests.configs import base_config, write_config
from tests.polling import eventually
from tests.processes import REPO, stop_process
from tests.sandboxing import uv_path
from tests.support import APP_UID, EchoUpstream, open_as_uid, run, socks5_connect

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
VERSION: str = PROJECT["version"]
PACKAGES = ("egress", "rules", "ratelimit")
DIST_INFO = f"egress-{VERSION}.dist-info"
STEP_TIMEOUT_S = 120.0  # each uv step; warm cache: about a second each


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    workdir: Path  # outside the checkout: the cwd of every command

    def env(self) -> dict[str, str]:
        """What a service manager gives a unit: no PYTHONPATH, no VIRTUAL_ENV, no checkout."""
        return {"PATH": f"{self.venv / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / command[0]), *command[1:]],
            cwd=self.workdir,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )


def _uv(*args: str, cwd: Path) -> None:
    """Run uv as an operator would: not inside this test run's virtualenv or project."""
    unset = ("VIRTUAL_ENV", "PYTHONPATH", "UV_PROJECT_ENVIRONMENT")
    env = {k: v for k, v in os.environ.items() if k not in unset} | {"UV_NO_PROGRESS": "1"}
    done = subprocess.run(
        [uv_path(), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"uv {' '.join(args)} exited {done.returncode}: {done.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("packaging")
    dist, venv, workdir = root / "dist", root / "venv", root / "work"
    workdir.mkdir()
    _uv("build", "--wheel", "--out-dir", str(dist), str(REPO), cwd=root)
    (wheel,) = dist.glob("*.whl")
    _uv("venv", "-q", "--python", sys.executable, str(venv), cwd=root)
    # The dependencies at uv.lock's versions: a new upstream release must not fail this test.
    pins = root / "constraints.txt"
    _uv("export", "--frozen", "--no-hashes", "--no-dev", "--all-extras", "--no-emit-project",
        "--quiet", "--project", str(REPO), "--output-file", str(pins), cwd=root)  # fmt: skip
    _uv("pip", "install", "-q", "--python", str(venv / "bin" / "python"),
        "--constraint", str(pins), f"{wheel}[uvloop,firewall]", cwd=root)  # fmt: skip
    return Installed(wheel, venv, workdir)


def test_wheel_holds_the_packages_the_shim_boot_and_the_license_but_no_tests(
    installed: Installed,
) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = email.parser.Parser().parsestr(wheel.read(f"{DIST_INFO}/METADATA").decode())
        entry_points = wheel.read(f"{DIST_INFO}/entry_points.txt").decode()
        shipped_license = wheel.read(f"{DIST_INFO}/licenses/LICENSE")
    assert {name.split("/")[0] for name in names} == {*PACKAGES, DIST_INFO}  # no tests/, bench/
    for needed in ("egress/sandbox/boot/sitecustomize.py", *(f"{p}/py.typed" for p in PACKAGES)):
        assert needed in names
    on_disk = {
        path.relative_to(REPO).as_posix()
        for package in PACKAGES
        for path in (REPO / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert not on_disk - names, f"left out of the wheel: {sorted(on_disk - names)}"
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["Version"] == VERSION
    assert {"uvloop", "firewall"} <= set(metadata.get_all("Provides-Extra") or [])
    assert "egress = egress.cli:main" in entry_points
    license_text = (REPO / "LICENSE").read_bytes()
    assert shipped_license == license_text
    assert b"Apache License\n                           Version 2.0, January 2004" in license_text


def test_installed_cli_runs_from_the_wheel_alone(installed: Installed) -> None:
    version = installed.run("egress", "--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"egress {VERSION}")

    imported = installed.run(
        "python", "-c", "import egress, egress.sandbox, uvloop, sys; print(egress.__file__)"
    )
    assert imported.returncode == 0, imported.stderr
    assert Path(imported.stdout.strip()).is_relative_to(installed.venv), imported.stdout

    checked = installed.run("egress", "check-config", str(REPO / "config.example.toml"))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip(), "check-config printed no summary"

    # No --config: the default path, said in the help and read (or named as missing).
    assert DEFAULT_CONFIG_PATH in installed.run("egress", "proxy", "--help").stdout
    default = installed.run("egress", "check-config")
    if Path(DEFAULT_CONFIG_PATH).exists():  # a node that has one: the same as naming it
        named = installed.run("egress", "check-config", "--config", DEFAULT_CONFIG_PATH)
        assert (default.returncode, default.stdout) == (named.returncode, named.stdout)
    else:
        assert default.returncode == 2
        assert f"{DEFAULT_CONFIG_PATH}: got no such file or directory" in default.stderr

    # The shim from the wheel's boot/ directory: a UDP socket is refused. --proxy is enough;
    # the default config is not read (it need not exist).
    udp = "import socket\ntry: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    udp += "except PermissionError as e: print('refused:', e)"
    sandboxed = installed.run(
        "egress", "sandbox", "--proxy", "127.0.0.1:1", "--", "python", "-c", udp
    )
    assert sandboxed.returncode == 0, sandboxed.stderr
    assert sandboxed.stdout.startswith("refused:"), sandboxed.stdout


@pytest.mark.root  # the client socket is owned by an app uid (tests/support.socket_as_uid)
def test_installed_proxy_starts_on_uvloop_and_relays_for_an_app(installed: Installed) -> None:
    run("asyncio", _proxy_exchange(installed))


async def _proxy_exchange(installed: Installed) -> None:
    async with EchoUpstream() as echo:
        config = write_config(
            installed.workdir / "egress.toml",
            base_config(
                admin={"listen": "127.0.0.1:0"},
                security={"allow_special": ["127.0.0.0/8"]},
                app=[{"name": "blog", "uids": [str(APP_UID)], "allow": [f"127.0.0.1:{echo.port}"]}],
            ),
        )
        with _proxy(installed, config) as (proc, stderr):
            started = await eventually(
                lambda: _started(proc, stderr), "the installed proxy logged 'proxy started'",
                timeout=15, detail=stderr.read_text,
            )  # fmt: skip
            listeners = dict(item.split("=") for item in started["listeners"].split(", "))
            host, port = listeners["socks5"].rsplit(":", 1)
            reader, writer = await open_as_uid(APP_UID, host, int(port))
            try:
                assert await socks5_connect(reader, writer, "127.0.0.1", echo.port) == 0
                writer.write(b"from the wheel")
                assert await reader.readexactly(14) == b"from the wheel"
            finally:
                writer.close()
            metrics = await asyncio.to_thread(_get, f"http://{started['admin']}/metrics")
            (build,) = [m for m in metrics.splitlines() if m.startswith("egress_build_info{")]
            assert 'loop="uvloop"' in build and f'version="{VERSION}"' in build, build
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 10) == 0, stderr.read_text()


def _started(proc: subprocess.Popen[bytes], stderr: Path) -> dict[str, Any] | None:
    """Its "proxy started" line once written (complete lines only); fails if it exited."""
    exited = proc.poll() is not None  # before reading: its last words still count
    text = stderr.read_text()
    for line in text[: text.rfind("\n") + 1].splitlines():
        entry = json.loads(line)
        if entry.get("msg") == "proxy started":
            return dict(entry)
    assert not exited, f"the proxy exited {proc.returncode}: {text}"
    return None


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # a loopback admin listener
        return str(response.read().decode())


@contextmanager
def _proxy(installed: Installed, config: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``egress proxy --config CONFIG`` from the virtualenv; stopped by pid however it ends."""
    stderr_path = config.with_suffix(".stderr")
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [str(installed.venv / "bin" / "egress"), "proxy", "--config", str(config)],
            cwd=installed.workdir,
            env=installed.env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            yield proc, stderr_path
        finally:
            stop_process(proc)
