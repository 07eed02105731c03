"""Installed first on PYTHONPATH by ``egress sandbox``: load the shim, then the image's own
sitecustomize (if there is one), so both run as they would have.

The shim is loaded from the directory above this one under the name ``egress_sandbox``, so the
app sees neither an ``egress`` package nor this directory on ``sys.path`` afterwards. While it
loads, ``sys.path`` holds only the standard library: an app module named like one the shim
uses (an ``ipaddress.py`` of its own) cannot get in the way. If the shim fails to start anyway,
outbound connections are closed rather than left unpatched.
"""

# ruff: noqa: PLC0415 - each import waits for the sys.path its step needs

import os
import sys
from typing import Any


def _boot(here: str) -> None:
    import importlib.util

    package = os.path.dirname(here)
    saved = sys.path[:]
    stdlib = os.path.dirname(os.__file__)
    sys.path[:] = [stdlib, os.path.join(stdlib, "lib-dynload")]
    try:
        if "egress_sandbox" not in sys.modules:
            spec = importlib.util.spec_from_file_location(
                "egress_sandbox",
                os.path.join(package, "__init__.py"),
                submodule_search_locations=[package],
            )
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules["egress_sandbox"] = module
            spec.loader.exec_module(module)
        sys.modules["egress_sandbox"].install_from_environ()
    finally:
        sys.path[:] = saved


def _closed(error: BaseException) -> None:
    """The shim did not start: refuse every outbound TCP connect, from the C module alone."""
    import _socket
    import errno
    import socket

    message = (
        "egress: outbound connections are closed: the sandbox shim failed to start"
        f" ({type(error).__name__}: {error})"
    )
    inet = (socket.AF_INET, socket.AF_INET6)

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in inet:
            raise PermissionError(errno.EACCES, message)
        _socket.socket.connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if self.family in inet:
            return errno.EACCES
        return _socket.socket.connect_ex(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
    print(message, file=sys.stderr)


def _chain(here: str) -> None:
    import importlib.machinery
    import importlib.util

    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    theirs = importlib.machinery.PathFinder.find_spec("sitecustomize", sys.path)
    if theirs is not None and theirs.loader is not None:  # it replaces this module's entry
        module = importlib.util.module_from_spec(theirs)
        sys.modules["sitecustomize"] = module
        theirs.loader.exec_module(module)


_here = os.path.dirname(os.path.abspath(__file__))
try:
    _boot(_here)
except BaseException as _error:  # whatever it was, fail closed
    _closed(_error)
_chain(_here)
