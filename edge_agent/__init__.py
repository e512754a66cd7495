"""edge_agent: per-store smart-store IoT agent."""

__version__ = "0.1.0"
