"""flexmore."""
