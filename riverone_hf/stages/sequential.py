"""Calibrated quantization, block by block (the GPTQ/AQLM flow).

The decoder blocks are found with optimum's block discovery. Calibration windows run through the
model up to the first block; then, for each block in order, forward hooks collect XᵀX of its planned
Linears from the block's current inputs, those Linears are quantized, and the block — now quantized —
is run again to give the next block its inputs. Planned Linears outside the blocks get XᵀX from one
pass of the original model.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..aq.calibration import collect_xtx

logger = logging.getLogger(__name__)

QuantizeFn = Callable[[str, "torch.Tensor | None"], None]


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def _run_model(model: nn.Module, window: torch.Tensor) -> None:
    model(input_ids=window[None].to(model.device), use_cache=False)


def _capture_block_inputs(model: nn.Module, first_block: nn.Module, windows: torch.Tensor) -> list[tuple]:
    captured = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for window in windows:
            try:
                _run_model(model, window)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    output = block(*args, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(full name, module list) of the transformer blocks, via optimum's block discovery."""
    from optimum.gptq.utils import get_block_name_with_pattern

    prefix = get_block_name_with_pattern(model)
    return prefix, model.get_submodule(prefix)


@torch.no_grad()
def quantize_sequentially(
    model: nn.Module, names: list[str], windows: torch.Tensor, quantize: QuantizeFn, stage: str
) -> None:
    """Call `quantize(name, xtx)` for every name in `names`, block by block (see module docstring).

    Args:
        model: a transformers model with its dense weights loaded.
        names: full names of the Linears to quantize.
        windows: [num_samples, seq_len] token ids.
        quantize: replaces the named Linear given its XᵀX / n (None when no calibration row reached it).
        stage: the stage's name for progress bars and logs ("AQLM", "VQC").
    """
    prefix, blocks = find_blocks(model)
    by_block = {i: [n for n in names if n.startswith(f"{prefix}.{i}.")] for i in range(len(blocks))}
    outside = [n for n in names if not any(n in block_names for block_names in by_block.values())]

    outside_xtx: dict[str, torch.Tensor | None] = {}
    if outside:
        with collect_xtx({n: model.get_submodule(n) for n in outside}) as accumulators:
            for window in tqdm(windows, desc="calibration pass (outside blocks)", leave=False):
                _run_model(model, window)
        for name, accumulator in accumulators.items():
            outside_xtx[name] = accumulator.xtx() if accumulator.rows else None
            if accumulator.rows == 0:
                logger.warning("%s: no calibration text reaches %s; it gets no XᵀX", stage, name)

    last = max((i for i, block_names in by_block.items() if block_names), default=-1)
    inputs = _capture_block_inputs(model, blocks[0], windows) if last >= 0 else []
    for index in tqdm(range(last + 1), desc=f"{stage} (calibrated blocks)", unit="block"):
        block = blocks[index]
        if by_block[index]:
            with collect_xtx({n: model.get_submodule(n) for n in by_block[index]}) as accumulators:
                for args, kwargs in inputs:
                    _run_block(block, args, kwargs)
            for name in by_block[index]:
                logger.info("%s: %s with XᵀX from %d rows", stage, name, accumulators[name].rows)
                quantize(name, accumulators[name].xtx())
        if index < last:  # blocks after the last quantized one need no inputs
            inputs = [_with_hidden(args, kwargs, _run_block(block, args, kwargs)) for args, kwargs in inputs]

    for name in outside:
        quantize(name, outside_xtx[name])
