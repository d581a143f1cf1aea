"""The recipe: its typed schema (split by section), the YAML reader, error formatting, secret scrubbing."""
