"""The policy: rule syntax, host and address canonicalisation, special-purpose ranges, matching.

Nothing in this package does I/O or imports from :mod:`egress`; it is pure and can be tested
and fuzzed alone.
"""
