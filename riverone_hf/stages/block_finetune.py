"""Block fine-tuning (AQLM, Egiazarian et al. 2024, Alg. 1): after every Linear of a transformer block is
quantized, Adam fits the block's continuous parameters (codebooks, scales, norms, biases; never the codes)
so that the quantized block's output matches the DENSE block's output on the same inputs (which come from
the already-quantized blocks before it), or, with `targets="model"`, the dense model's own activation there.
A held-out split of the calibration windows stops it early.

Also the storage of the per-window block inputs and dense targets (`ActivationStore`): RAM in a chosen
dtype (float16 by default: half of fp32), or safetensors files in a directory (`offload_dir`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..modeling.aqlm_linear import AqlmLinear
from ..validation import require, require_bool, require_int, require_number

logger = logging.getLogger(__name__)

PARAMETER_KINDS = ("codebooks", "scales", "norms", "biases")
TARGET_KINDS = ("block", "model")
ACTIVATION_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class BlockFinetuneSpec:
    """Fine-tuning of each quantized block towards the dense block's outputs (AQLM's Alg. 1).

    Args:
        enabled (`bool`, defaults to False): fine-tune each block after its Linears are quantized (needs
            `calibration`).
        max_epochs (`int`, defaults to 10): most passes over the training windows, 0..10000.
        lr (`float`, defaults to 1e-4): Adam learning rate, > 0.
        batch_size (`int`, defaults to 4): calibration windows per Adam step (their gradients accumulate), >= 1.
        relative_tolerance (`float`, defaults to 0.01): stop when an epoch lowers the held-out relative
            output error by less than this fraction of the best so far, in [0, 1).
        held_out_fraction (`float`, defaults to 0.125): fraction of the calibration windows kept out of
            training to decide the early stop (at least one window when > 0; the training windows themselves
            when 0), in [0, 1).
        train (`list[str]`, defaults to all four): which parameter kinds train: "codebooks", "scales"
            (of the block's `AqlmLinear`s), "norms" (parameters of the block's normalisation layers),
            "biases" (every bias of the block). Codes never change.
        activation_dtype (`str`, defaults to "float16"): dtype in which the per-window block inputs and dense
            targets are kept while fine-tuning is on: "float16" or "bfloat16" (half of fp32: 128 windows x 512
            tokens x 2560 hidden of a 4B model is 0.67 GB per copy in fp32), or "float32".
        offload_dir (`str`, optional): keep those inputs and targets as safetensors files in a temporary
            directory under this path instead of RAM (deleted afterwards).
        seed (`int`, defaults to 0): seed of the held-out split and of the window order.
        targets (`str`, defaults to "block"): what the quantized block is fitted to: "block", the dense block's
            output on the block's current inputs (AQLM's Alg. 1: each block undoes its own error only); or
            "model", the dense MODEL's activation at the block's output (dense inputs through dense blocks), so
            each block also corrects the error the quantized blocks before it left; it keeps one more
            copy of the activations, the dense stream's (its outputs are the targets and its next inputs).
    """

    enabled: bool = field(default=False, metadata={"help": "Fine-tune each quantized block to the dense outputs."})
    max_epochs: int = field(default=10, metadata={"help": "Most passes over the training windows, 0..10000."})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate, > 0."})
    batch_size: int = field(default=4, metadata={"help": "Calibration windows per Adam step, >= 1."})
    relative_tolerance: float = field(
        default=0.01, metadata={"help": "Stop when an epoch gains less on the held-out error, in [0, 1)."}
    )
    held_out_fraction: float = field(
        default=0.125, metadata={"help": "Fraction of the windows held out for the early stop, in [0, 1)."}
    )
    train: list[str] = field(
        default_factory=lambda: list(PARAMETER_KINDS),
        metadata={"help": f"Parameter kinds that train, a non-empty subset of {list(PARAMETER_KINDS)}."},
    )
    activation_dtype: str = field(
        default="float16", metadata={"help": f"Dtype of the stored block inputs/targets: {list(ACTIVATION_DTYPES)}."}
    )
    offload_dir: str | None = field(
        default=None, metadata={"help": "Store block inputs/targets as files under this directory instead of RAM."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the held-out split and window order, >= 0."})
    targets: str = field(
        default="block", metadata={"help": f"Fit to the dense block's outputs or the dense model's: {list(TARGET_KINDS)}."}
    )

    def __post_init__(self):
        where = "block_finetune"
        require_bool(f"{where}.enabled", self.enabled)
        require_int(f"{where}.max_epochs", self.max_epochs, 0, 10_000)
        require_number(f"{where}.lr", self.lr, 0, None, low_open=True)
        require_int(f"{where}.batch_size", self.batch_size, 1, 1_000_000)
        require_number(f"{where}.relative_tolerance", self.relative_tolerance, 0, 1)
        require_number(f"{where}.held_out_fraction", self.held_out_fraction, 0, 1)
        require(
            isinstance(self.train, list) and self.train and all(k in PARAMETER_KINDS for k in self.train)
            and len(set(self.train)) == len(self.train),
            f"`{where}.train` must be a non-empty list of distinct kinds from {list(PARAMETER_KINDS)}, got {self.train!r}",
        )
        require(
            isinstance(self.activation_dtype, str) and self.activation_dtype in ACTIVATION_DTYPES,
            f"`{where}.activation_dtype` must be one of {list(ACTIVATION_DTYPES)}, got {self.activation_dtype!r}",
        )
        require(
            self.offload_dir is None or isinstance(self.offload_dir, str),
            f"`{where}.offload_dir` must be a directory path or None, got {self.offload_dir!r}",
        )
        require_int(f"{where}.seed", self.seed, 0, 2**63 - 1)
        require(
            isinstance(self.targets, str) and self.targets in TARGET_KINDS,
            f"`{where}.targets` must be one of {list(TARGET_KINDS)}, got {self.targets!r}",
        )


class ActivationStore:
    """Per-window tensors (block inputs or targets) in RAM in `dtype`, or as safetensors files under
    `offload_dir`. `dtype=None` keeps each tensor as given, in RAM. Call `close()` to delete the files."""

    def __init__(self, dtype: torch.dtype | None = None, offload_dir: str | None = None, name: str = "activations"):
        self.dtype = dtype
        self._items: list[torch.Tensor] = []
        self._dir = None if offload_dir is None else tempfile.mkdtemp(prefix=f"riverone-{name}-", dir=offload_dir)
        self._count = 0

    def append(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if self.dtype is not None:
            tensor = tensor.to(self.dtype)
        if self._dir is None:
            self._items.append(tensor)
        else:
            from safetensors.torch import save_file

            save_file({"t": tensor.cpu().contiguous()}, os.path.join(self._dir, f"{self._count}.safetensors"))
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self._count:
            raise IndexError(index)
        if self._dir is None:
            return self._items[index]
        from safetensors.torch import load_file

        return load_file(os.path.join(self._dir, f"{index}.safetensors"))["t"]

    def close(self) -> None:
        self._items.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def trainable_parameters(block: nn.Module, kinds: list[str]) -> dict[str, nn.Parameter]:
    """The block's floating-point parameters of the given kinds (see `BlockFinetuneSpec.train`), by name.
    Codes, and the weights of Linears left dense, never train."""
    chosen: dict[str, nn.Parameter] = {}
    for module_name, module in block.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        for param_name, param in module.named_parameters(recurse=False):
            if not param.is_floating_point():
                continue
            full = f"{module_name}.{param_name}" if module_name else param_name
            if param_name == "bias":
                kind = "biases"
            elif isinstance(module, AqlmLinear) and param_name in ("codebooks", "scales"):
                kind = param_name
            elif is_norm:
                kind = "norms"
            else:
                continue
            if kind in kinds:
                chosen[full] = param
    return chosen


@dataclass
class FinetuneResult:
    """Relative output error ||f_q(x) - f(x)||² / ||f(x)||² of one block on the held-out windows (the
    training windows when none are held out), before and after fine-tuning."""

    error_before: float
    error_after: float
    epochs: int
    steps: int
    held_out: int
    parameters: int


def split_windows(num_windows: int, held_out_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) window indices: a seeded random `held_out_fraction` (>= 1 when > 0 and there
    are >= 2 windows) is held out."""
    order = torch.randperm(num_windows, generator=torch.Generator().manual_seed(seed)).tolist()
    held = 0 if held_out_fraction == 0 or num_windows < 2 else max(1, round(held_out_fraction * num_windows))
    held = min(held, num_windows - 1)
    return sorted(order[held:]), sorted(order[:held])


def finetune_block(
    block: nn.Module,
    num_windows: int,
    forward: Callable[[int], torch.Tensor],
    target: Callable[[int], torch.Tensor],
    spec: BlockFinetuneSpec,
    name: str = "block",
) -> FinetuneResult:
    """Adam on the block's chosen parameters (`spec.train`) to minimise sum_i ||forward(i) - target(i)||² /
    sum_i ||target(i)||² over the training windows, with early stopping on the held-out windows; the best
    parameters (lowest held-out error, the starting ones included) are kept.

    Args:
        block: the quantized block (its `AqlmLinear`s' codes stay as they are).
        num_windows: number of calibration windows.
        forward: i -> the block's output on window i (run with the gradient enabled).
        target: i -> the dense output to match on window i (see `BlockFinetuneSpec.targets`; any dtype,
            compared in the output's).
        spec: the settings.
        name: the block's name for logs.
    """
    params = trainable_parameters(block, spec.train)
    train_ids, held_ids = split_windows(num_windows, spec.held_out_fraction, spec.seed)
    eval_ids = held_ids or train_ids
    saved_flags = {n: p.requires_grad for n, p in block.named_parameters()}

    def error(ids: list[int]) -> float:
        num = den = 0.0
        with torch.no_grad():
            for i in ids:
                out = forward(i).double()
                ref = target(i).to(out.dtype)
                num += (out - ref).square().sum().item()
                den += ref.square().sum().item()
        return num / den if den > 0 else 0.0

    before = error(eval_ids)
    best = before
    epochs = steps = 0
    if not params or spec.max_epochs == 0 or not train_ids:
        return FinetuneResult(before, before, 0, 0, len(held_ids), sum(p.numel() for p in params.values()))

    for p in block.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.Adam(list(params.values()), lr=spec.lr)
    generator = torch.Generator().manual_seed(spec.seed + 1)
    try:
        with torch.no_grad():
            denominator = sum(target(i).double().square().sum().item() for i in train_ids) or 1.0
        for epoch in range(spec.max_epochs):
            order = [train_ids[j] for j in torch.randperm(len(train_ids), generator=generator).tolist()]
            for start in range(0, len(order), spec.batch_size):
                batch = order[start:start + spec.batch_size]
                optimizer.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    for i in batch:
                        out = forward(i)
                        loss = (out.float() - target(i).float()).square().sum() * (len(order) / len(batch) / denominator)
                        loss.backward()
                optimizer.step()
                steps += 1
            epochs = epoch + 1
            current = error(eval_ids)
            if not math.isfinite(current):
                raise FloatingPointError(f"block fine-tuning of {name}: held-out error became {current}")
            logger.info("block fine-tuning %s epoch %d: held-out relative output error %.6f", name, epochs, current)
            gain = (best - current) / best if best > 0 else 0.0
            if current < best:
                best = current
                snapshot = {n: p.detach().clone() for n, p in params.items()}
            if gain < spec.relative_tolerance:
                break
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(snapshot[n])  # the best parameters seen (an in-place copy: kernel caches see it)
        for n, p in block.named_parameters():
            p.requires_grad_(saved_flags[n])
    return FinetuneResult(before, best, epochs, steps, len(held_ids), sum(p.numel() for p in params.values()))
