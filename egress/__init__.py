"""egress: a network egress proxy and firewall controller for multi-tenant app hosting."""

__version__ = "0.1.0"
