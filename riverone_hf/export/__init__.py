"""Export of riverone checkpoints to other formats (stock transformers AQLM)."""
