"""CLI command modules registered by skin_offline/cli.py (heavy imports inside the command bodies)."""
