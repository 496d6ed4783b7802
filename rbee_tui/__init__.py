"""rbee-tui: a terminal dashboard for a home lab of LLM inference machines."""

__version__ = "0.1.0"
