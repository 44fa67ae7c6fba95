"""Measurements of compressed models: perplexity, size accounting, VQC accounting."""
