"""Importing this installs the shim from the environment (the ``.pth`` hook's one line)."""

from . import install_from_environ

install_from_environ()
