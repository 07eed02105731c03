"""Rate limiting: GCRA bucket math (:mod:`ratelimit.gcra`), in-memory and Redis bucket
backends, a circuit breaker, and the :class:`ratelimit.failover.Limiter` the proxy calls."""
