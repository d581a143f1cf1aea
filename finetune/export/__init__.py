"""Exports of a trained run: a verified merged checkpoint and adapters laid out for serving engines."""
