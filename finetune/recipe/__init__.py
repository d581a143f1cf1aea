"""The recipe: its typed schema, the YAML reader, and how its errors read."""
