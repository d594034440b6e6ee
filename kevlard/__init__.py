"""kevlard: a fault-tolerant LLM serving daemon (see docs/structure.md)."""

__version__ = "0.1.0"
