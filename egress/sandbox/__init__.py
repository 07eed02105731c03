"""The sandbox socket shim: an unmodified Python app's outbound TCP goes through egress.

Standard library only, with relative imports, so the package also works copied on its own into
an app image (as ``egress_sandbox``) without the rest of egress or any of its dependencies.
Two ways in:

* ``egress sandbox --proxy 127.0.0.1:1080 -- python app.py`` runs the program with this
  package's ``boot/`` directory first on ``PYTHONPATH``, whose ``sitecustomize`` installs the
  shim at interpreter start (and then runs the image's own ``sitecustomize``, if any);
* ``egress sandbox --install-hook SITE_PACKAGES`` copies the package into an image's
  site-packages with a ``.pth`` hook, so every interpreter there starts with the shim.

Either way the settings come from the environment (:mod:`.settings`). What the shim does is in
:mod:`.patch` and :mod:`.aio`; what it speaks to the proxy, in :mod:`.wire`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from .errors import EgressDenied, EgressRateLimited
from .patch import install, installed, uninstall
from .settings import SandboxConfigError, Settings

__all__ = [
    "EgressDenied",
    "EgressRateLimited",
    "SandboxConfigError",
    "Settings",
    "install",
    "install_from_environ",
    "installed",
    "uninstall",
]


def install_from_environ(environ: Mapping[str, str] | None = None) -> None:
    """Install with the settings in ``environ`` (default: this process's). Bad or missing
    settings install the shim *closed*, with one line on stderr: nothing gets out that way,
    and the app's error names the variable to fix."""
    try:
        settings = Settings.from_environ(os.environ if environ is None else environ)
    except SandboxConfigError as exc:
        print(f"egress sandbox: {exc}; outbound connections are refused", file=sys.stderr)
        install(None, str(exc))
        return
    install(settings)
