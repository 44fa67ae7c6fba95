"""find_vision_tower and the adapter table: where the tower and its blocks are found in each supported
architecture, what the tower reports, and the ValueError for a model without a supported tower."""

import pytest
from torch import nn

from riverone_hf.modeling.vision_blocks import ADAPTERS, VisionAdapter, VisionTower, find_vision_tower
from tests.tiny_models import tiny_clip_vision, tiny_internvl, tiny_qwen3, tiny_siglip_vision, tiny_vit

# (id, builder, tower name, model_type, blocks, first block's full name, prefix tokens, heads)
TOWERS = [
    # the root ViTForImageClassification also has model_type "vit" but holds no `layers`: the tower is `vit`
    ("vit-classifier", tiny_vit, "vit", "vit", 4, "vit.layers.0", 1, 4),
    ("internvl", tiny_internvl, "model.vision_tower", "internvl_vision", 2, "model.vision_tower.encoder.layer.0", 1, 2),
    # CLIPVisionModel / SiglipVisionModel are the towers themselves: the root, named ""
    ("clip-tower", tiny_clip_vision, "", "clip_vision_model", 4, "encoder.layers.0", 1, 4),
    ("siglip-tower-no-cls", tiny_siglip_vision, "", "siglip_vision_model", 4, "encoder.layers.0", 0, 4),
]


@pytest.mark.parametrize(
    "builder, name, model_type, num_blocks, first_block, prefix_tokens, heads",
    [case[1:] for case in TOWERS],
    ids=[case[0] for case in TOWERS],
)
def test_finds_the_tower_and_its_blocks(builder, name, model_type, num_blocks, first_block, prefix_tokens, heads):
    model = builder()
    tower = find_vision_tower(model)
    assert isinstance(tower, VisionTower)
    assert tower.name == name and tower.module is model.get_submodule(name)
    assert tower.adapter is ADAPTERS[model_type] and tower.config.model_type == model_type
    assert isinstance(tower.blocks, nn.ModuleList) and len(tower.blocks) == num_blocks
    assert tower.block_name(0) == first_block
    for index in range(num_blocks):  # block_name is the full name from the model root
        assert model.get_submodule(tower.block_name(index)) is tower.blocks[index]
        assert tower.attention(index) is tower.blocks[index].get_submodule(tower.adapter.attention)
        assert tower.mlp(index) is tower.blocks[index].get_submodule(tower.adapter.mlp)
    assert tower.num_prefix_tokens == prefix_tokens
    assert tower.num_heads == heads and tower.hidden_size == 32
    assert isinstance(tower.patch_embedding, nn.Conv2d)
    assert tower.patch_embedding.out_channels == tower.hidden_size


def test_a_tower_taken_out_of_its_model_has_an_empty_name_and_root_relative_block_names():
    tower_module = tiny_internvl().model.vision_tower
    tower = find_vision_tower(tower_module)
    assert tower.name == "" and tower.module is tower_module
    assert tower.block_name(1) == "encoder.layer.1"
    assert tower_module.get_submodule(tower.block_name(1)) is tower.blocks[1]


def test_every_adapter_row_is_keyed_by_its_model_type():
    assert sorted(ADAPTERS) == ["clip_vision_model", "internvl_vision", "siglip_vision_model", "vit"]
    for model_type, adapter in ADAPTERS.items():
        assert isinstance(adapter, VisionAdapter) and adapter.model_type == model_type


@pytest.mark.parametrize(
    "builder, found",
    [(tiny_qwen3, "['qwen3']"), (lambda: nn.Sequential(nn.Linear(2, 2)), "[]")],
    ids=["qwen3-text-only", "plain-module-no-config"],
)
def test_no_supported_tower_lists_the_supported_types(builder, found):
    model = builder()
    with pytest.raises(ValueError, match="has no supported vision tower") as error:
        find_vision_tower(model)
    message = str(error.value)
    assert message.startswith(type(model).__name__)
    assert f"model types found: {found}" in message
    assert str(sorted(ADAPTERS)) in message  # every supported type, listed
    assert "VisionAdapter" in message  # how to add one
