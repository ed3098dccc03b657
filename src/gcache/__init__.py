"""gcache: multi-agent LLM reasoning through fused KV caches over a learned communication graph."""

__version__ = "0.1.0"
