"""Per-architecture adapters for vision-transformer towers: where the blocks live and what they hold.

One row of `ADAPTERS` per transformers `model_type` of a vision tower. Adding an architecture is one
row, provided its attention module computes attention through `ALL_ATTENTION_FUNCTIONS` (the way
transformers' InternVL, ViT, SigLIP and CLIP vision models do), so that MiniViT's eager head-mixing
function can take its place, and its patch embedding is a `Conv2d` whose output is the patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class VisionAdapter:
    """Where things are inside one vision-tower architecture (paths relative to the tower module).

    Args:
        model_type: the tower's `config.model_type`.
        blocks: the `nn.ModuleList` of transformer blocks.
        attention: inside a block, the attention module (it calls `ALL_ATTENTION_FUNCTIONS`).
        mlp: inside a block, the MLP module (called with the normed hidden states as first argument).
        patch_embedding: the `Conv2d` that cuts the image into patches (its output is [B, C, H, W]).
        num_prefix_tokens: number of tokens before the patch tokens (CLS, registers).
    """

    model_type: str
    blocks: str
    attention: str
    mlp: str
    patch_embedding: str
    num_prefix_tokens: int


ADAPTERS: dict[str, VisionAdapter] = {
    adapter.model_type: adapter
    for adapter in (
        VisionAdapter("internvl_vision", "encoder.layer", "attention", "mlp",
                      "embeddings.patch_embeddings.projection", 1),
        VisionAdapter("vit", "layers", "attention", "mlp", "embeddings.patch_embeddings.projection", 1),
        VisionAdapter("clip_vision_model", "encoder.layers", "self_attn", "mlp", "embeddings.patch_embedding", 1),
        VisionAdapter("siglip_vision_model", "encoder.layers", "self_attn", "mlp", "embeddings.patch_embedding", 0),
    )
}


@dataclass
class VisionTower:
    """A supported vision tower found inside a model: its full name, the module and its adapter."""

    name: str
    module: nn.Module
    adapter: VisionAdapter

    @property
    def config(self):
        return self.module.config

    @property
    def blocks(self) -> nn.ModuleList:
        return self.module.get_submodule(self.adapter.blocks)

    def block_name(self, index: int) -> str:
        """Full name (from the model root) of block `index`."""
        return ".".join(p for p in (self.name, self.adapter.blocks, str(index)) if p)

    def attention(self, index: int) -> nn.Module:
        return self.blocks[index].get_submodule(self.adapter.attention)

    def mlp(self, index: int) -> nn.Module:
        return self.blocks[index].get_submodule(self.adapter.mlp)

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_prefix_tokens(self) -> int:
        return self.adapter.num_prefix_tokens

    @property
    def patch_embedding(self) -> nn.Conv2d:
        return self.module.get_submodule(self.adapter.patch_embedding)


def _resolves(module: nn.Module, adapter: VisionAdapter) -> bool:
    try:
        module.get_submodule(adapter.blocks)
    except AttributeError:
        return False
    return True


def find_vision_tower(model: nn.Module) -> VisionTower:
    """The outermost module of `model` whose `config.model_type` has an adapter and that holds the blocks.

    Raises ValueError listing the supported model types when there is none.
    """
    seen = []
    for name, module in model.named_modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if model_type is None:
            continue
        seen.append(model_type)
        adapter = ADAPTERS.get(model_type)
        if adapter is not None and _resolves(module, adapter):
            return VisionTower(name, module, adapter)
    raise ValueError(
        f"{type(model).__name__} has no supported vision tower (model types found: {sorted(set(seen))}); "
        f"MiniViT supports the vision model types {sorted(ADAPTERS)}. To add one, add a `VisionAdapter` row "
        "to `riverone_hf.modeling.vision_blocks.ADAPTERS`"
    )
