"""The MiniViT stage: share attention + MLP weights across groups of adjacent vision blocks (arXiv 2204.07154).

`plan` checks the spec against the meta skeleton before any weight loads (supported tower, block range)
and claims the grouped blocks' attention and MLP modules so that later stages (AQLM, VQC) leave them
alone; `apply` shares the loaded weights and adds the identity transforms; `rebuild` re-creates the same
sharing and transforms on the skeleton of a saved riverone checkpoint, so its single copy of each shared
tensor loads into every block of the group.

`quantization_map` entry of each block of a group, keyed by the block's full name:
``{"stage": "minivit", "group": [0, 1], "transforms": ["attention", "mlp"], "conv_kernel_size": 3}``.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field

from torch import nn

from ..config import StagePlan
from ..modeling.minivit import accounting, declare_ties, share_blocks
from ..modeling.vision_blocks import VisionTower, find_vision_tower
from ..validation import require, require_int

logger = logging.getLogger(__name__)


class MiniViTTransform(str, enum.Enum):
    """The per-block transforms MiniViT adds to a shared block."""

    ATTENTION = "attention"
    """heads x heads mixing of the attention logits before softmax and of the maps after it (those blocks
    then compute attention eagerly)."""
    MLP = "mlp"
    """a depthwise convolution over the 2-D patch grid of the MLP input, residual, initialised to zero
    (CLS/register tokens bypass it)."""


@dataclass
class MiniViTSpec:
    """MiniViT weight multiplexing of vision-transformer blocks (arXiv 2204.07154).

    Within a group of adjacent blocks every block uses the first block's attention and MLP modules;
    each block keeps its own norms and layer-scales and gets small transforms initialised to identity.

    Args:
        groups (`list[list[int]]`, optional): explicit groups of adjacent block indices, e.g. ``[[0, 1], [2, 3]]``.
        share_every (`int`, optional): instead of `groups`, share every `share_every` adjacent blocks in
            ``[start, end)`` (`end` None: the last block).
        start, end (`int`, optional): the block range for `share_every`.
        transforms (`list[str]`, defaults to ["attention", "mlp"]): which per-block transforms to add:
            "attention" (heads x heads mixing of the logits before and the maps after softmax; those blocks
            then compute attention eagerly) and/or "mlp" (a depthwise convolution over the 2-D patch grid
            of the MLP input, residual, initialised to zero; CLS/register tokens bypass it). `[]`: plain sharing.
        conv_kernel_size (`int`, defaults to 3): odd kernel size of the MLP transform's convolution.
    """

    groups: list[list[int]] | None = field(
        default=None, metadata={"help": "Explicit groups of adjacent block indices, e.g. [[0, 1], [2, 3]]."}
    )
    share_every: int | None = field(
        default=None, metadata={"help": "Instead of `groups`: share every N adjacent blocks in [start, end), N >= 2."}
    )
    start: int = field(default=0, metadata={"help": "First block of the `share_every` range."})
    end: int | None = field(default=None, metadata={"help": "End (exclusive) of the `share_every` range; None: last."})
    transforms: list[MiniViTTransform] = field(
        default_factory=lambda: [MiniViTTransform.ATTENTION, MiniViTTransform.MLP],
        metadata={"help": "Per-block transforms: 'attention' and/or 'mlp'; [] for plain sharing."},
    )
    conv_kernel_size: int = field(default=3, metadata={"help": "Odd kernel size of the MLP transform's conv, >= 1."})

    def __post_init__(self):
        require(
            (self.groups is None) != (self.share_every is None),
            f"`minivit` needs exactly one of `groups` or `share_every`; got groups={self.groups!r}, "
            f"share_every={self.share_every!r}",
        )
        if self.groups is not None:
            require(
                isinstance(self.groups, list) and self.groups
                and all(isinstance(g, list) and len(g) >= 2 for g in self.groups),
                f"`minivit.groups` must be a non-empty list of lists of >= 2 block indices, got {self.groups!r}",
            )
            seen: set[int] = set()
            for group in self.groups:
                for index in group:
                    require_int("minivit.groups[][]", index, 0, 1_000_000)
                require(
                    group == list(range(group[0], group[0] + len(group))),
                    f"`minivit.groups` entry {group} must list adjacent blocks in increasing order",
                )
                overlap = seen & set(group)
                require(not overlap, f"`minivit.groups` overlap on block(s) {sorted(overlap)}")
                seen |= set(group)
        else:
            require_int("minivit.share_every", self.share_every, 2, 1_000_000)
        require(
            self.share_every is not None or (self.start == 0 and self.end is None),
            f"`minivit.start`/`minivit.end` apply only with `share_every`; with `groups` list the blocks "
            f"themselves (got start={self.start!r}, end={self.end!r})",
        )
        require_int("minivit.start", self.start, 0, 1_000_000)
        require(self.end is None or (isinstance(self.end, int) and not isinstance(self.end, bool)
                                     and self.start < self.end <= 1_000_000),
                 f"`minivit.end` must be None or an integer > start ({self.start}), got {self.end!r}")
        allowed = [t.value for t in MiniViTTransform]
        require(
            isinstance(self.transforms, list) and all(isinstance(t, str) and t in allowed for t in self.transforms)
            and len(set(self.transforms)) == len(self.transforms),
            f"`minivit.transforms` must be a list of distinct entries drawn from {allowed} ([] for plain "
            f"sharing), got {self.transforms!r}",
        )
        self.transforms = [MiniViTTransform(t) for t in self.transforms]
        require(
            isinstance(self.conv_kernel_size, int) and not isinstance(self.conv_kernel_size, bool)
            and 1 <= self.conv_kernel_size <= 99 and self.conv_kernel_size % 2 == 1,
            f"`minivit.conv_kernel_size` must be an odd integer in [1, 99], got {self.conv_kernel_size!r}",
        )

    def resolve_groups(self, num_blocks: int) -> list[list[int]]:
        """The groups of block indices for a tower of `num_blocks` blocks; ValueError if out of range."""
        if self.groups is not None:
            groups = self.groups
        else:
            end = num_blocks if self.end is None else self.end
            groups = [list(range(i, min(i + self.share_every, end))) for i in range(self.start, end, self.share_every)]
            groups = [g for g in groups if len(g) >= 2]
        bad = sorted({i for g in groups for i in g if i >= num_blocks})
        require(not bad, f"`minivit` names block(s) {bad}, but the vision tower has {num_blocks} blocks (0..{num_blocks - 1})")
        require(groups, f"`minivit` selects no group of >= 2 blocks among the {num_blocks} blocks")
        return groups



def _claim(tower: VisionTower, groups: list[list[int]]) -> set[str]:
    names = set()
    for index in (i for g in groups for i in g):
        for part in (tower.adapter.attention, tower.adapter.mlp):
            prefix = f"{tower.block_name(index)}.{part}"
            names |= {f"{prefix}.{n}" if n else prefix for n, _ in tower.blocks[index].get_submodule(part).named_modules()}
    return names


def _share(model: nn.Module, groups: list[list[int]], transforms: list[str], conv_kernel_size: int) -> VisionTower:
    tower = find_vision_tower(model)
    declare_ties(model, share_blocks(tower, groups, transforms, conv_kernel_size))
    return tower


class MiniViTStage:
    """The MiniViT stage (see the module docstring); registered in `riverone_hf.stages`."""

    name = "minivit"
    spec_class = MiniViTSpec
    required_packages = ()

    def check(self, spec: MiniViTSpec) -> None:
        """Nothing outside the model is needed."""

    def plan(self, model: nn.Module, spec: MiniViTSpec, claimed: set[str]) -> StagePlan:
        """Find the vision tower, resolve and range-check the groups; ValueError before any weight loads."""
        tower = find_vision_tower(model)
        groups = spec.resolve_groups(len(tower.blocks))
        mine = _claim(tower, groups)
        taken = sorted(mine & set(claimed))
        if taken:
            raise ValueError(f"`minivit` groups {groups} include modules an earlier stage converts: {taken[:5]}")
        return StagePlan(modules=[tower.block_name(i) for g in groups for i in g], claimed=mine)

    def apply(self, model: nn.Module, spec: MiniViTSpec, plan: StagePlan) -> dict[str, dict]:
        """Share the loaded weights of the planned groups; log the accounting; return the map entries."""
        groups = spec.resolve_groups(len(find_vision_tower(model).blocks))
        transforms = [t.value for t in spec.transforms]
        tower = _share(model, groups, transforms, spec.conv_kernel_size)
        logger.info("MiniViT stage on %s, groups %s:\n%s", tower.name or "the model", groups,
                    "\n".join(accounting(model, tower).lines()))
        return {
            tower.block_name(index): {
                "stage": self.name, "group": list(group), "transforms": transforms,
                "conv_kernel_size": spec.conv_kernel_size,
            }
            for group in groups
            for index in group
        }

    def check_entry(self, module_name: str, entry: dict) -> None:
        """ValueError naming the module and the field for a malformed `quantization_map` entry (group, transforms
        and kernel size are checked by `MiniViTSpec`'s own rules)."""
        missing = [k for k in ("group", "transforms", "conv_kernel_size") if k not in entry]
        require(not missing, f"`quantization_map[{module_name!r}]` (minivit) lacks field(s) {missing}")
        try:
            MiniViTSpec(groups=[entry["group"]], transforms=entry["transforms"],
                        conv_kernel_size=entry["conv_kernel_size"])
        except ValueError as err:
            raise ValueError(f"`quantization_map[{module_name!r}]` (minivit): {err}") from None

    def rebuild(self, model: nn.Module, entries: dict[str, dict]) -> None:
        """Re-create the recorded sharing and transforms on the (meta) skeleton of a riverone checkpoint."""
        tower = find_vision_tower(model)
        by_setting: dict[tuple, list[list[int]]] = {}
        for name, entry in entries.items():
            group = entry["group"]
            if name not in {tower.block_name(i) for i in group}:
                raise ValueError(f"quantization_map entry `{name}` does not name a block of its group {group} "
                                 f"(blocks are `{tower.block_name(0)}`, ...)")
            setting = (tuple(entry["transforms"]), entry["conv_kernel_size"])
            if group not in by_setting.setdefault(setting, []):
                by_setting[setting].append(group)
        for (transforms, conv_kernel_size), groups in by_setting.items():
            MiniViTSpec(groups=groups, transforms=list(transforms), conv_kernel_size=conv_kernel_size).resolve_groups(
                len(tower.blocks)
            )
            _share(model, groups, list(transforms), conv_kernel_size)

    def report(self, model: nn.Module, entries: dict[str, dict]) -> list[str]:
        tower = find_vision_tower(model)
        groups = sorted({tuple(e["group"]) for e in entries.values()})
        return [f"MiniViT stage on {tower.name or 'the model'}, groups {[list(g) for g in groups]}:",
                *accounting(model, tower).lines()]

    def dequantize(self, model: nn.Module, dtype=None) -> int:
        """Nothing to undo: shared blocks are ordinary full-precision modules (their sharing and transforms
        are the compressed model's function, so they stay); returns 0."""
        return 0
