"""The HTTP API: health, readiness and Prometheus metrics for monitoring; /api/v1 for tools, with a token."""
