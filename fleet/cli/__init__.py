"""The ``fleet`` command line (typer + rich)."""
