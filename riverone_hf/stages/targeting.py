"""Which modules a stage targets: regex selection of Linears, ownership by earlier stages, tied weights."""

from __future__ import annotations

import re

from torch import nn


def linears_matching(linears: dict[str, nn.Linear], patterns: list[str], field_name: str) -> list[str]:
    """Names of `linears` that some pattern `re.fullmatch`es; ValueError for a pattern that matches none."""
    for pattern in patterns:
        if not any(re.fullmatch(pattern, name) for name in linears):
            raise ValueError(
                f"`{field_name}` pattern {pattern!r} matches no Linear (re.fullmatch on full module names); "
                f"examples of names: {list(linears)[:5]}"
            )
    return [name for name in linears if any(re.fullmatch(p, name) for p in patterns)]


def is_claimed(name: str, claimed: set[str]) -> bool:
    """Whether `name` or a module above it was taken by an earlier stage."""
    return name in claimed or any(name.startswith(owner + ".") for owner in claimed)


def tied_module_names(model: nn.Module) -> set[str]:
    """Modules whose weight is tied to another tensor (transformers' `all_tied_weights_keys`)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {key.removesuffix(".weight") for pair in tied.items() for key in pair}
