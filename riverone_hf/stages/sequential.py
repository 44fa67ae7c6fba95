"""Calibrated quantization, block by block (the GPTQ/AQLM flow).

The decoder blocks are found with optimum's block discovery. Calibration windows run through the
model up to the first block; then, for each block in order, forward hooks collect XᵀX of its planned
Linears from the block's current inputs, those Linears are quantized, and the block — now quantized —
is run again to give the next block its inputs. Planned Linears outside the blocks get XᵀX from one
pass of the original model.

Two options (the AQLM paper's Alg. 1):
  - `true_sequential`: within a block, the Linears are quantized group by group in the order the block
    calls them (Linears that read the same input tensor form one group: q/k/v, then o_proj, then
    gate/up, then down_proj in a Llama/Qwen block), and each group's XᵀX is collected with the groups
    before it already quantized.
  - `finetune` (`BlockFinetuneSpec`): the dense block's outputs on the current inputs are kept as
    targets; once the block's Linears are quantized, its continuous parameters are fine-tuned towards
    them (`block_finetune.finetune_block`), and its relative output error before and after is logged,
    with a per-block summary at the end. While it is on, the per-window block inputs and targets are
    kept in `finetune.activation_dtype` (float16 by default), or in files under `finetune.offload_dir`.
    With `finetune.targets == "model"` a second stream of activations runs the calibration windows through
    the dense blocks (each block's dense pass happens before it is quantized), and each quantized block is
    fitted to that stream's output instead: the dense model's activation at that depth.

Several processes (`torchrun`, `accelerate launch` with real ranks: `torch.distributed` initialised): every
rank runs the same block passes on the same windows; the Linears of each group are dealt to the ranks by
size (`balanced_owners`: largest first, to the least-loaded rank), each rank quantizes its own and builds an
empty `skeleton` for the others, and the owner broadcasts every tensor of each new module, so all ranks end
with the same model as one process would (fine-tuning then runs identically on every rank).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..aq.calibration import collect_xtx
from .block_finetune import ACTIVATION_DTYPES, ActivationStore, BlockFinetuneSpec, FinetuneResult, finetune_block

logger = logging.getLogger(__name__)

QuantizeFn = Callable[[str, "torch.Tensor | None"], None]
SkeletonFn = Callable[[str], None]


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised `torch.distributed` group, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def balanced_owners(sizes: list[int], ranks: int) -> list[int]:
    """The rank that quantizes each of the matrices of `sizes` (weights each): largest first, each to the rank
    with the fewest weights so far (ties: the lower rank), so ranks get about equal work; deterministic, the
    same on every rank."""
    loads = [0] * ranks
    owners = [0] * len(sizes)
    for j in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        owner = min(range(ranks), key=lambda r: (loads[r], r))
        owners[j] = owner
        loads[owner] += sizes[j]
    return owners


def _quantize_names(model: nn.Module, xtxs: dict[str, "torch.Tensor | None"], quantize: QuantizeFn,
                    skeleton: SkeletonFn | None) -> None:
    """`quantize(name, xtx)` for each name; with several ranks, each name is quantized by the rank
    `balanced_owners` gives it and broadcast from there (every rank needs `skeleton`)."""
    rank, size = world()
    if size == 1 or len(xtxs) == 0:
        for name, xtx in xtxs.items():
            quantize(name, xtx)
        return
    if skeleton is None:
        raise ValueError(f"quantizing on {size} ranks needs a `skeleton` callback")
    import torch.distributed as dist

    names = list(xtxs)
    owners = balanced_owners([model.get_submodule(name).weight.numel() for name in names], size)
    for name, owner in zip(names, owners):
        if owner == rank:
            quantize(name, xtxs[name])
        else:
            skeleton(name)
    for name, owner in zip(names, owners):
        for tensor in model.get_submodule(name).state_dict().values():
            carrier = tensor if tensor.is_floating_point() else tensor.to(torch.int64)  # gloo: no int16
            dist.broadcast(carrier, src=owner)
            if carrier is not tensor:
                tensor.copy_(carrier)


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


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _cast_floats(value, dtype: torch.dtype):
    """`value` with every floating-point tensor inside (tuples, lists, dicts) cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def _block_dtype(block: nn.Module) -> torch.dtype:
    return next((p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(full name, module list) of the transformer blocks, via optimum's block discovery."""
    from optimum.gptq.utils import get_block_name_with_pattern

    prefix = get_block_name_with_pattern(model)
    return prefix, model.get_submodule(prefix)


def call_order_groups(names: dict[str, nn.Module], run_once: Callable[[], object]) -> list[list[str]]:
    """The modules `names` (full name -> module) in the order `run_once()` (one forward of their block)
    calls them, grouped: consecutive calls that read the same input tensor form one group. Modules never
    called come last, as one group."""
    calls: list[tuple[str, torch.Tensor]] = []  # the inputs are kept alive so that no id is reused

    def record(name):
        def hook(_module, inputs):
            if all(seen != name for seen, _ in calls):
                calls.append((name, inputs[0]))
        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in names.items()]
    try:
        run_once()
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    previous = None
    for name, tensor in calls:
        if groups and tensor is previous:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = tensor
    never = [name for name in names if all(seen != name for seen, _ in calls)]
    return groups + ([never] if never else [])


@torch.no_grad()
def quantize_sequentially(
    model: nn.Module,
    names: list[str],
    windows: torch.Tensor,
    quantize: QuantizeFn,
    stage: str,
    *,
    true_sequential: bool = False,
    finetune: BlockFinetuneSpec | None = None,
    skeleton: SkeletonFn | None = None,
) -> dict[int, FinetuneResult]:
    """Call `quantize(name, xtx)` for every name in `names`, block by block (see module docstring).

    Args:
        model: a transformers model with its dense weights loaded.
        names: full names of the Linears to quantize.
        windows: [num_samples, seq_len] token ids.
        quantize: replaces the named Linear given its XᵀX / n (None when no calibration row reached it).
        stage: the stage's name for progress bars and logs ("AQLM", "VQC").
        true_sequential: quantize each block's Linears group by group in call order (see module docstring).
        finetune: fine-tune each block after quantizing it, when given and `enabled`.
        skeleton: replaces the named Linear by an empty module of the quantized kind (needed with several
            `torch.distributed` ranks: the owner's tensors are broadcast into it).

    Returns:
        block index -> `FinetuneResult` for every fine-tuned block (empty without fine-tuning).
    """
    finetune = finetune if finetune is not None and finetune.enabled else None
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

    storage = {} if finetune is None else {
        "dtype": ACTIVATION_DTYPES[finetune.activation_dtype], "offload_dir": finetune.offload_dir
    }
    last = max((i for i, block_names in by_block.items() if block_names), default=-1)
    contexts = _capture_block_inputs(model, blocks[0], windows) if last >= 0 else []
    hidden = ActivationStore(name="inputs", **storage)  # the current block's input per window
    for args, kwargs in contexts:
        hidden.append(_hidden_of(args, kwargs))
    contexts = [_with_hidden(args, kwargs, None) for args, kwargs in contexts]  # the rest of each call

    # with `targets="model"`, the dense model's own activations, carried through the still-dense blocks
    dense_hidden = None
    if finetune is not None and finetune.targets == "model":
        dense_hidden = ActivationStore(name="dense-inputs", **storage)
        for i in range(len(hidden)):
            dense_hidden.append(hidden[i])

    def run(block: nn.Module, i: int, inputs: ActivationStore | None = None) -> torch.Tensor:
        """The block's output on window i, from `inputs` (default: the quantized stream's current inputs)."""
        dtype = _block_dtype(block)
        args, kwargs = contexts[i]
        args, kwargs = _with_hidden(args, kwargs, (hidden if inputs is None else inputs)[i].to(dtype))
        if storage:  # inputs stored in another dtype, or a half block trained in float32
            args, kwargs = _cast_floats(args, dtype), _cast_floats(kwargs, dtype)
        return _run_block(block, args, kwargs)

    results: dict[int, FinetuneResult] = {}
    try:
        for index in tqdm(range(last + 1), desc=f"{stage} (calibrated blocks)", unit="block"):
            block = blocks[index]
            if dense_hidden is not None:
                dense_outputs = ActivationStore(name="dense-outputs", **storage)  # the block is still dense here
                for i in range(len(contexts)):
                    dense_outputs.append(run(block, i, dense_hidden))
                dense_hidden.close()
                dense_hidden = dense_outputs
            if by_block[index]:
                results.update(_quantize_block(model, block, index, by_block[index], len(contexts), run, quantize,
                                               stage, true_sequential, finetune, storage, skeleton, dense_hidden))
            if index < last:  # blocks after the last quantized one need no inputs
                following = ActivationStore(name="inputs", **storage)
                for i in range(len(contexts)):
                    following.append(run(block, i))
                hidden.close()
                hidden = following
    finally:
        hidden.close()
        if dense_hidden is not None:
            dense_hidden.close()

    _quantize_names(model, {name: outside_xtx[name] for name in outside}, quantize, skeleton)
    if results:
        logger.info("%s block fine-tuning summary (relative output error of each block, held-out windows):", stage)
        for index, result in results.items():
            logger.info("  block %d: %.6f -> %.6f (%d epochs, %d steps, %d parameters)", index,
                        result.error_before, result.error_after, result.epochs, result.steps, result.parameters)
    return results


def _quantize_block(model, block, index, names, num_windows, run, quantize, stage, true_sequential, finetune,
                    storage, skeleton, model_targets=None) -> dict[int, FinetuneResult]:
    """Quantize the planned Linears `names` of one block (group by group with `true_sequential`), then
    fine-tune it when `finetune` is given, towards `model_targets` (the dense model's activations at the
    block's output) when given, else towards the dense block's outputs on its current inputs."""
    modules = {n: model.get_submodule(n) for n in names}
    if true_sequential:
        with torch.no_grad():
            groups = call_order_groups(modules, lambda: run(block, 0))
        logger.info("%s block %d: true-sequential groups %s", stage, index,
                    [[n.rsplit(".", 1)[-1] for n in g] for g in groups])
    else:
        groups = [names]
    own_targets = finetune is not None and model_targets is None
    targets = ActivationStore(name="targets", **storage) if own_targets else model_targets
    try:
        for position, group in enumerate(groups):
            with collect_xtx({n: model.get_submodule(n) for n in group}) as accumulators:
                for i in range(num_windows):
                    output = run(block, i)
                    if own_targets and position == 0:  # the block is still dense in the first pass
                        targets.append(output)
            for name in group:
                logger.info("%s: %s with XᵀX from %d rows", stage, name, accumulators[name].rows)
            _quantize_names(model, {name: accumulators[name].xtx() for name in group}, quantize, skeleton)
        if finetune is None:
            return {}
        dtype = _block_dtype(block)
        if dtype != torch.float32:
            block.float()  # Adam on half-precision parameters loses small updates
        try:
            result = finetune_block(block, num_windows, lambda i: run(block, i), targets.__getitem__, finetune,
                                    name=f"{stage} block {index}")
        finally:
            block.to(dtype)
        logger.info("%s block %d: relative output error %.6f before fine-tuning, %.6f after (%d epochs)",
                    stage, index, result.error_before, result.error_after, result.epochs)
        return {index: result}
    finally:
        if own_targets:
            targets.close()

