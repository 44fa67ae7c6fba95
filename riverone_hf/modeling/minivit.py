"""MiniViT weight multiplexing (arXiv 2204.07154) on transformers vision towers.

Sharing. Within a group of adjacent blocks, every block computes with the first block's attention and
MLP weights: the same `nn.Linear` (and norm, ...) objects, so the same tensors. Each block keeps its own
attention and MLP *module* (a shell holding its config and its transforms, whose children are the first
block's), its own LayerNorms and its own layer-scales, so parameter names stay those of the original
model and a block's transforms live under its own name.

Transforms (per block, every block of a group, identity at the start):
- `HeadMixing` (`<attention>.minivit_mix`): a heads x heads matrix applied to the attention logits
  before softmax and another to the attention maps after softmax. This needs the logits, so those
  attention modules compute attention with `minivit_attention_forward`, an eager implementation
  registered in transformers' `AttentionInterface` as "riverone_minivit" (sdpa/flash give no logits).
- `PatchGridConv` (`<mlp>.minivit_conv`): a depthwise convolution over the 2-D patch grid of the MLP's
  input, added as a residual branch initialised to zero; CLS/register tokens pass through untouched.
  The grid (height, width in patches) is read from the output of the tower's patch-embedding Conv2d,
  so non-square images work.

Saving: the shared tensors are declared tied (`_tied_weights_keys` on each sharing block, and
`all_tied_weights_keys` on the model), so `save_pretrained` writes each of them once.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface

from .vision_blocks import VisionTower

logger = logging.getLogger(__name__)

ATTENTION_IMPLEMENTATION = "riverone_minivit"
TRANSFORM_PREFIX = "minivit_"
MIB = 2**20


class HeadMixing(nn.Module):
    """Per-block mixing across heads: logits[b, h] <- sum_g A[h, g] logits[b, g] before softmax and
    maps[b, h] <- sum_g B[h, g] maps[b, g] after softmax. A and B start as the identity."""

    def __init__(self, num_heads: int, device=None, dtype=None):
        super().__init__()
        eye = torch.eye(num_heads, device=device, dtype=dtype)
        self.before_softmax = nn.Parameter(eye.clone())
        self.after_softmax = nn.Parameter(eye.clone())

    @staticmethod
    def mix(matrix: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """`scores` [batch, heads, queries, keys] mixed across heads by `matrix` [heads, heads]."""
        return torch.einsum("hg,bgqk->bhqk", matrix.to(scores.dtype), scores)


def minivit_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """Eager attention with MiniViT head mixing (when `module` has a `minivit_mix`); same signature and
    outputs ([B, N, heads, head_dim] and the maps [B, heads, N, N]) as transformers' attention functions."""
    if key.shape[1] != query.shape[1]:  # grouped key/value heads
        repeats = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    mix = getattr(module, "minivit_mix", None)
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    if mix is not None:
        logits = mix.mix(mix.before_softmax, logits)
    if attention_mask is not None:
        logits = logits + attention_mask[..., : key.shape[-2]]
    maps = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    if mix is not None:
        maps = mix.mix(mix.after_softmax, maps)
    maps = nn.functional.dropout(maps, p=dropout, training=module.training)
    output = torch.matmul(maps, value).transpose(1, 2).contiguous()
    return output, maps


AttentionInterface.register(ATTENTION_IMPLEMENTATION, minivit_attention_forward)


def use_eager_attention(attention: nn.Module) -> str | None:
    """Make this one attention module compute with `minivit_attention_forward` (other modules sharing its
    config are unaffected: it gets its own shallow copy of the config). Returns the previous implementation."""
    previous = attention.config._attn_implementation
    if previous != ATTENTION_IMPLEMENTATION:
        config = copy.copy(attention.config)
        config._attn_implementation = ATTENTION_IMPLEMENTATION
        attention.config = config
    return previous


class PatchGrid:
    """Height and width, in patches, of the images the tower embedded last (set by a forward hook on the
    tower's patch-embedding Conv2d)."""

    def __init__(self):
        self.shape: tuple[int, int] | None = None

    def resolve(self, num_patches: int) -> tuple[int, int]:
        if self.shape is not None and self.shape[0] * self.shape[1] == num_patches:
            return self.shape
        side = math.isqrt(num_patches)
        if side * side == num_patches:
            return side, side
        raise ValueError(
            f"MiniViT conv transform: cannot lay {num_patches} patch tokens on a 2-D grid (last grid seen by the "
            f"patch embedding: {self.shape}); run the vision tower on pixel_values, not on precomputed embeddings"
        )


def _record_patch_grid(module: nn.Module, args, output: torch.Tensor) -> None:
    module.minivit_grid.shape = (int(output.shape[-2]), int(output.shape[-1]))


def attach_patch_grid(tower: VisionTower) -> PatchGrid:
    """The tower's `PatchGrid`, created (with its hook on the patch embedding) on first use."""
    conv = tower.patch_embedding
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"`{tower.adapter.patch_embedding}` of {tower.adapter.model_type} is a {type(conv).__name__}, "
                         "not the Conv2d the MLP transform reads the patch grid from")
    if getattr(conv, "minivit_grid", None) is None:
        conv.minivit_grid = PatchGrid()
        conv.register_forward_hook(_record_patch_grid)
    return conv.minivit_grid


class PatchGridConv(nn.Module):
    """x + depthwise_conv(x) on the patch tokens laid out on their 2-D grid; prefix tokens pass through.
    The convolution starts at zero, so the module starts as the identity."""

    def __init__(self, channels: int, kernel_size: int, num_prefix_tokens: int, grid: PatchGrid, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                              device=device, dtype=dtype)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = grid

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        prefix, patches = hidden_states[:, : self.num_prefix_tokens], hidden_states[:, self.num_prefix_tokens :]
        batch, num_patches, channels = patches.shape
        height, width = self.grid.resolve(num_patches)
        image = patches.transpose(1, 2).reshape(batch, channels, height, width)
        patches = patches + self.conv(image).flatten(2).transpose(1, 2)
        return torch.cat([prefix, patches], dim=1)

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}"


def _transform_mlp_input(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a transformed MLP: its input goes through the block's `minivit_conv` first."""
    if args:
        return (module.minivit_conv(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": module.minivit_conv(kwargs["hidden_states"])}


def share_module(source: nn.Module, target: nn.Module) -> None:
    """Make `target` compute with `source`'s children, parameters and buffers (the very same objects)."""
    for name, child in source.named_children():
        setattr(target, name, child)
    for name, parameter in source._parameters.items():
        target.register_parameter(name, parameter)
    for name, buffer in source._buffers.items():
        target.register_buffer(name, buffer, persistent=name not in source._non_persistent_buffers_set)


def _tensor_names(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters(remove_duplicate=False)] + [
        n for n, _ in module.named_buffers(remove_duplicate=False)
    ]


def add_transforms(tower: VisionTower, index: int, transforms: list[str], conv_kernel_size: int) -> str | None:
    """Give block `index` its identity-initialised transforms; returns the attention implementation that
    the head mixing replaced (None when there is no attention transform)."""
    attention, mlp = tower.attention(index), tower.mlp(index)
    reference = next(attention.parameters())
    device, dtype = reference.device, reference.dtype
    previous = None
    if "attention" in transforms and getattr(attention, "minivit_mix", None) is None:
        attention.minivit_mix = HeadMixing(tower.num_heads, device=device, dtype=dtype)
        previous = use_eager_attention(attention)
    if "mlp" in transforms and getattr(mlp, "minivit_conv", None) is None:
        grid = attach_patch_grid(tower)
        mlp.minivit_conv = PatchGridConv(tower.hidden_size, conv_kernel_size, tower.num_prefix_tokens, grid,
                                         device=device, dtype=dtype)
        mlp.register_forward_pre_hook(_transform_mlp_input, with_kwargs=True)
    return previous


def share_blocks(
    tower: VisionTower, groups: list[list[int]], transforms: list[str], conv_kernel_size: int
) -> dict[str, str]:
    """Apply MiniViT to `tower`: share attention + MLP weights within each group and add the transforms.

    Works on a loaded model and on a meta skeleton. Returns the tied names `{target: source}` (full names
    from the model root) and declares them on each sharing block for `save_pretrained`.
    """
    adapter = tower.adapter
    wanted = {i for g in groups for i in g}
    already = sorted(wanted & ({i for g in shared_groups(tower) for i in g} | {
        i for i in wanted if any(TRANSFORM_PREFIX in n for n, _ in tower.blocks[i].named_modules())
    }))
    if already:
        raise ValueError(f"MiniViT is already applied to block(s) {already} of {tower.name or 'the model'}")
    tied: dict[str, str] = {}
    for group in groups:
        first = tower.blocks[group[0]]
        for index in group[1:]:
            block = tower.blocks[index]
            declared = {}
            for part in (adapter.attention, adapter.mlp):
                share_module(first.get_submodule(part), block.get_submodule(part))
                for name in _tensor_names(block.get_submodule(part)):
                    relative = f"{part}.{name}"
                    tied[f"{tower.block_name(index)}.{relative}"] = f"{tower.block_name(group[0])}.{relative}"
                    declared[re.escape(relative) + "$"] = f"{tower.block_name(group[0])}.{relative}"
            block._tied_weights_keys = declared
    replaced = set()
    for index in (i for group in groups for i in group):
        previous = add_transforms(tower, index, transforms, conv_kernel_size)
        if previous not in (None, "eager", ATTENTION_IMPLEMENTATION):
            replaced.add(previous)
    if replaced:
        logger.warning(
            "MiniViT: the attention of the %d shared blocks of %s now runs eagerly (%r) instead of %s: head "
            "mixing needs the attention logits and maps; the other blocks keep their implementation",
            sum(len(g) for g in groups), tower.name or "the model", ATTENTION_IMPLEMENTATION, sorted(replaced),
        )
    return tied


def declare_ties(model: nn.Module, tied: dict[str, str]) -> None:
    """Record `{target: source}` in the model's `all_tied_weights_keys`, so that loading does not report
    (or re-initialise) the targets as missing and device maps keep them together."""
    existing = getattr(model, "all_tied_weights_keys", None)
    if existing is None:
        model.all_tied_weights_keys = dict(tied)
    else:
        existing.update(tied)


def shared_groups(tower: VisionTower) -> list[list[int]]:
    """The groups of adjacent blocks that compute with the same attention weights, read from the model."""
    groups: list[list[int]] = []
    previous_key = None
    for index in range(len(tower.blocks)):
        key = tuple(id(p) for n, p in tower.attention(index).named_parameters() if TRANSFORM_PREFIX not in n)
        if groups and key and key == previous_key:
            groups[-1].append(index)
        else:
            groups.append([index])
        previous_key = key
    return [g for g in groups if len(g) > 1]


def _shared_tensors(tower: VisionTower, index: int) -> list[torch.Tensor]:
    """The attention + MLP parameters of block `index` that its group shares (transforms excluded)."""
    out = []
    for part in (tower.attention(index), tower.mlp(index)):
        out += [p for n, p in part.named_parameters() if TRANSFORM_PREFIX not in n]
    return out


def per_block_parameters(tower: VisionTower) -> list[nn.Parameter]:
    """Parameters each block of a shared group owns: transforms, norms, layer-scales."""
    out = []
    for group in shared_groups(tower):
        shared = {id(p) for p in _shared_tensors(tower, group[0])}
        for index in group:
            out += [p for p in tower.blocks[index].parameters() if id(p) not in shared]
    return out


def shared_parameters(tower: VisionTower) -> list[nn.Parameter]:
    """The attention + MLP parameters the shared groups use (each once)."""
    return [p for group in shared_groups(tower) for p in _shared_tensors(tower, group[0])]


def _count(tensors) -> tuple[int, int]:
    tensors = list(tensors)
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class GroupAccount:
    """What one group of blocks saves and costs."""

    blocks: list[int]
    removed_params: int
    removed_bytes: int
    added_params: int
    added_bytes: int


@dataclass
class MiniViTAccounting:
    """Parameters of the whole model before and after MiniViT, each shared tensor counted once."""

    params_after: int
    bytes_after: int
    groups: list[GroupAccount] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return self.params_after + sum(g.removed_params - g.added_params for g in self.groups)

    @property
    def bytes_before(self) -> int:
        return self.bytes_after + sum(g.removed_bytes - g.added_bytes for g in self.groups)

    def lines(self) -> list[str]:
        def row(label: str, params: int, size: int) -> str:
            return f"  {label:<34} {params:>14,d} params {size:>14,d} B {size / MIB:>10.3f} MiB"

        rows = [row("parameters before", self.params_before, self.bytes_before)]
        for g in self.groups:
            rows.append(row(f"group {g.blocks}: removed (shared)", -g.removed_params, -g.removed_bytes))
            rows.append(row(f"group {g.blocks}: added (transforms)", g.added_params, g.added_bytes))
        rows.append(row("parameters after", self.params_after, self.bytes_after))
        change = self.params_after - self.params_before
        rows.append(f"  net change: {change:+,d} params ({change / max(self.params_before, 1):+.2%})")
        return rows


def accounting(model: nn.Module, tower: VisionTower) -> MiniViTAccounting:
    """Measure, on the shared model, what MiniViT removed and added (counts and bytes as stored)."""
    report = MiniViTAccounting(*_count(model.parameters()))
    for group in shared_groups(tower):
        removed = _count(_shared_tensors(tower, group[0]))
        added = _count(
            p for i in group for n, p in tower.blocks[i].named_parameters(remove_duplicate=False) if TRANSFORM_PREFIX in n
        )
        extra = len(group) - 1
        report.groups.append(GroupAccount(group, removed[0] * extra, removed[1] * extra, *added))
    return report
