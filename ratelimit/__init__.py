"""Rate limiting: the interface the proxy calls. Memory and Redis backends come later."""
