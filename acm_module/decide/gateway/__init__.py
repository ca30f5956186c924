"""The gateway context: carriers, their gateways and routes, rate limits (docs/GATEWAY.md)."""
