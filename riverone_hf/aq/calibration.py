"""XᵀX collection: forward hooks that accumulate the input second moment of Linear layers.

The AQ objective ||(W - Ŵ) X||² / n only needs xtx = XᵀX / n per Linear, so calibration keeps
one [in_features, in_features] float64 accumulator per layer instead of the activations.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class XtxAccumulator:
    """Running XᵀX / n over every row that passes through one Linear (float64 accumulator)."""

    def __init__(self, in_features: int, device=None):
        """An empty [in_features, in_features] float64 sum on `device`."""
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Add the rows of `inputs` [..., in_features] (every leading index is one row)."""
        rows = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
        self.sum.addmm_(rows.T, rows)
        self.rows += rows.shape[0]

    def xtx(self) -> torch.Tensor:
        """[in_features, in_features] float64 XᵀX / n over the rows added so far; ValueError if none."""
        if self.rows == 0:
            raise ValueError("no calibration rows reached this layer")
        return self.sum / self.rows


@contextmanager
def collect_xtx(modules: dict[str, nn.Linear]) -> Iterator[dict[str, XtxAccumulator]]:
    """Within the block, every forward of `modules[name]` adds its input rows to the yielded accumulator."""
    accumulators = {name: XtxAccumulator(m.in_features, device=m.weight.device) for name, m in modules.items()}
    handles = [
        module.register_forward_pre_hook(lambda _mod, args, acc=accumulators[name]: acc.add(args[0].detach()))
        for name, module in modules.items()
    ]
    try:
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()
