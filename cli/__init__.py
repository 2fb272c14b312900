"""The `dlserve` command (cli/main.py)."""
