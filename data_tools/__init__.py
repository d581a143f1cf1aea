"""Data pipeline: formats → canonical conversations, validation with file:line, chat formatting, masks, packing."""
