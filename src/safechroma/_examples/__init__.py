"""Runnable examples: ``python -m safechroma._examples.<name>``. Not part of the public API."""
