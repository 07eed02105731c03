"""Installed first on PYTHONPATH by ``egress sandbox``: load the shim, then the image's own
sitecustomize (if there is one), so both run as they would have.

The shim is loaded from the directory above this one under the name ``egress_sandbox``, so the
app sees neither an ``egress`` package nor this directory on ``sys.path`` afterwards.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _boot() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    package = os.path.dirname(here)
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
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    theirs = importlib.machinery.PathFinder.find_spec("sitecustomize", sys.path)
    if theirs is not None and theirs.loader is not None:  # it replaces this module's entry
        module = importlib.util.module_from_spec(theirs)
        sys.modules["sitecustomize"] = module
        theirs.loader.exec_module(module)


_boot()
