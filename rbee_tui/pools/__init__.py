"""Dashboard side: reaching pools (local subprocess or SSH) and speaking `rbee-hive --json` to them."""
