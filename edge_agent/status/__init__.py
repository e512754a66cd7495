"""Local status for the engineer on site: /healthz, /readyz, /metrics, a page, and ``edge-agent status``."""
