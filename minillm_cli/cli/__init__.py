"""The Typer app: one thin module per command. Nothing here imports torch at module level."""
