"""The only part of riverone_hf that talks to transformers' quantizer API (plus the pure-torch AQ engine in `aq/`)."""
