"""The transformers side of riverone_hf: the quantizer behind quant_method "riverone"."""
