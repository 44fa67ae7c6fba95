"""The MiniViT stage: share attention + MLP weights across groups of adjacent vision blocks.

Stage protocol (see `hf_quantizer.STAGES`): `plan` checks the spec against the meta skeleton before any
weight loads (supported tower, block range) and claims the grouped blocks' attention and MLP modules so
that later stages (AQLM, VQC) leave them alone; `apply` shares the loaded weights and adds the identity
transforms; `rebuild` re-creates the same sharing and transforms on the skeleton of a saved riverone
checkpoint, so its single copy of each shared tensor loads into every block of the group.

`quantization_map` entry of each block of a group, keyed by the block's full name:
``{"stage": "minivit", "group": [0, 1], "transforms": ["attention", "mlp"], "conv_kernel_size": 3}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..config import MiniViTSpec
from ..modeling.minivit import accounting, declare_ties, share_blocks
from ..modeling.vision_blocks import VisionTower, find_vision_tower

STAGE = "minivit"


@dataclass
class MiniViTPlan:
    """The groups `apply` will share, and the module names it takes from later stages."""

    tower_name: str
    groups: list[list[int]]
    claimed: set[str] = field(default_factory=set)


def _claim(tower: VisionTower, groups: list[list[int]]) -> set[str]:
    names = set()
    for index in (i for g in groups for i in g):
        for part in (tower.adapter.attention, tower.adapter.mlp):
            prefix = f"{tower.block_name(index)}.{part}"
            names |= {f"{prefix}.{n}" if n else prefix for n, _ in tower.blocks[index].get_submodule(part).named_modules()}
    return names


def plan(model: nn.Module, spec: MiniViTSpec, claimed: set[str] = frozenset()) -> MiniViTPlan:
    """Find the vision tower, resolve and range-check the groups; ValueError before any weight loads."""
    tower = find_vision_tower(model)
    groups = spec.resolve_groups(len(tower.blocks))
    mine = _claim(tower, groups)
    taken = sorted(mine & set(claimed))
    if taken:
        raise ValueError(f"`minivit` groups {groups} include modules an earlier stage converts: {taken[:5]}")
    return MiniViTPlan(tower.name, groups, mine)


def _share(model: nn.Module, groups: list[list[int]], transforms: list[str], conv_kernel_size: int) -> VisionTower:
    tower = find_vision_tower(model)
    declare_ties(model, share_blocks(tower, groups, transforms, conv_kernel_size))
    return tower


def apply(model: nn.Module, spec: MiniViTSpec, plan: MiniViTPlan) -> dict[str, dict]:
    """Share the loaded weights of the planned groups; returns their quantization_map entries."""
    tower = _share(model, plan.groups, spec.transforms, spec.conv_kernel_size)
    print(f"MiniViT stage on {tower.name or 'the model'}, groups {plan.groups}:\n"
          + "\n".join(accounting(model, tower).lines()), flush=True)
    return {
        tower.block_name(index): {
            "stage": STAGE, "group": list(group), "transforms": list(spec.transforms),
            "conv_kernel_size": spec.conv_kernel_size,
        }
        for group in plan.groups
        for index in group
    }


def rebuild(model: nn.Module, entries: dict[str, dict]) -> None:
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
