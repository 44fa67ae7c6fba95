"""Text shipped with riverone_hf for its demo (see README.md here for provenance)."""
