"""Screens and widgets: they render state the services own and post messages; no I/O here."""
