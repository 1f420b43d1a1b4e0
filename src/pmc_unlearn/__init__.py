"""pmc-unlearn: make language models forget, with Partial Model Collapse and its baselines."""

__version__ = "0.1.0"
