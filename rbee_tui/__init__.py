"""rbee-tui: a terminal dashboard for a home lab of LLM inference machines."""

__version__ = "0.1.0"
PROTOCOL = 2  # the `rbee-hive --json` protocol (docs/protocol.md): a mismatch refuses to connect
