"""The `nsa` command: a Typer app (main.py wires it), one module per command."""
