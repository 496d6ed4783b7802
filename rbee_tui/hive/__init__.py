"""The node agent `rbee-hive`: catalog, downloads, workers and metrics of one pool. No UI imports here."""
