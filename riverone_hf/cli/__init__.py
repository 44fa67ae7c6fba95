"""The `riverone` command and what only commands need: the compress-and-save pipeline, atomic output
directories, the demo and its shipped assets."""

from .main import main

__all__ = ["main"]
