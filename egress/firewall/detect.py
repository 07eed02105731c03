"""Which iptables the host uses, and which backend may write there.

Rules an operator cannot see are worse than none: on a host whose ``iptables`` is the nf_tables
variant, ``iptables -L``/``iptables-save`` list only the nf_tables tables, so rules written to
the legacy tables (all python-iptables can write) would be invisible while still filtering.
We refuse that combination with an error saying what to use instead.
"""

from __future__ import annotations

import subprocess
from typing import Literal

from egress.config import FirewallBackend
from egress.errors import EgressError
from egress.firewall.backend import Backend, BackendError
from egress.firewall.backend_restore import RestoreBackend

__all__ = ["HostMode", "choose_backend", "host_iptables_mode"]

HostMode = Literal["nft", "legacy"]


def host_iptables_mode(iptables: str = "iptables") -> HostMode:
    """``"nft"`` or ``"legacy"``, from ``iptables --version`` ("... (nf_tables)" / "(legacy)")."""
    try:
        result = subprocess.run(
            [iptables, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BackendError(
            f"cannot run {iptables} --version ({error}); install the iptables package"
        ) from None
    text = result.stdout + result.stderr
    if "(nf_tables)" in text:
        return "nft"
    if "(legacy)" in text:
        return "legacy"
    raise BackendError(
        f"cannot tell the iptables variant from {iptables} --version: {text.strip()!r}"
        ' (expected "(nf_tables)" or "(legacy)"); set [firewall].backend explicitly'
    )


class BackendRefusedError(EgressError):
    """The chosen backend would write rules the host's own tools do not show."""


def choose_backend(choice: FirewallBackend | str, mode: HostMode | None = None) -> Backend:
    """The backend for ``choice`` on a host in ``mode`` (detected when ``None``).

    ``auto`` is python-iptables on legacy hosts and ``iptables-restore`` (nft variant) on
    nf_tables hosts; ``iptables-restore`` uses the host's variant; ``iptc`` on an nf_tables host
    is refused.
    """
    choice = FirewallBackend(choice)
    host = mode if mode is not None else host_iptables_mode()
    if choice is FirewallBackend.IPTC and host == "nft":
        raise BackendRefusedError(
            "backend iptc: python-iptables writes the legacy tables, which `iptables -L` on this"
            ' nf_tables host does not show; use backend = "iptables-restore" or "auto"'
        )
    if choice is FirewallBackend.IPTC or (choice is FirewallBackend.AUTO and host == "legacy"):
        from egress.firewall.backend_iptc import IptcBackend  # noqa: PLC0415 - optional dep

        return IptcBackend()
    return RestoreBackend(host)
