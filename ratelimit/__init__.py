"""Rate limiting: the interface the proxy calls. Backends (memory, Redis) arrive in a later issue."""
