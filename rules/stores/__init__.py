"""Rule stores: where apps and their rules live, versioned, with an audit trail.

:class:`~rules.stores.base.RuleStore` is the one interface every face uses (the proxy and the
firewall controller to follow, the CLI and the admin API to edit); a backend supplies storage:
memory (tests), the TOML config file, Redis (shared by every node). Unlike the rest of
``rules``, this package does I/O; it still knows nothing of ``egress``.
"""
