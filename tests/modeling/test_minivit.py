"""MiniViT sharing on tiny vision towers of every supported architecture: which tensors are shared,
exact parameter delta, identity start and the transforms' semantics (finding the tower through the
adapter table: tests/modeling/test_vision_blocks.py)."""

import copy

import pytest
import torch

from riverone_hf.modeling.minivit import (
    ATTENTION_IMPLEMENTATION,
    HeadMixing,
    PatchGrid,
    PatchGridConv,
    accounting,
    minivit_attention_forward,
    share_blocks,
    shared_groups,
    use_eager_attention,
)
from riverone_hf.modeling.vision_blocks import find_vision_tower
from tests.tiny_models import pixel_values, tiny_clip_vision, tiny_internvl, tiny_siglip_vision, tiny_vit


def internvl_tower():
    return tiny_internvl().model.vision_tower


# (id, builder, groups, channels of pixel_values)
TEST_CASES = [
    ("internvl", internvl_tower, [[0, 1]], 3),
    ("vit", tiny_vit, [[0, 1], [2, 3]], 1),
    ("clip", tiny_clip_vision, [[1, 2, 3]], 3),
    ("siglip", tiny_siglip_vision, [[0, 1], [2, 3]], 3),
]
CASES = pytest.mark.parametrize("builder, groups, channels", [c[1:] for c in TEST_CASES], ids=[c[0] for c in TEST_CASES])
TRANSFORMS = ["attention", "mlp"]


def shared_model(builder, groups, transforms=TRANSFORMS, kernel=3):
    model = builder()
    share_blocks(find_vision_tower(model), groups, transforms, kernel)
    return model


def outputs(model, channels):
    with torch.no_grad():
        out = model(pixel_values=pixel_values(channels=channels))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def unique_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@CASES
def test_groups_share_attention_and_mlp_tensors_but_not_norms(builder, groups, channels):
    model = shared_model(builder, groups)
    tower = find_vision_tower(model)
    assert shared_groups(tower) == groups
    for group in groups:
        first = tower.blocks[group[0]]
        for index in group[1:]:
            block = tower.blocks[index]
            for part in (tower.adapter.attention, tower.adapter.mlp):
                for (name, a), (_, b) in zip(first.get_submodule(part).named_parameters(),
                                             block.get_submodule(part).named_parameters()):
                    same = a is b and a.data_ptr() == b.data_ptr()
                    assert same == ("minivit_" not in name), f"block {index} {part}.{name}"
            own = [n for n, _ in block.named_parameters() if "norm" in n or "lambda" in n]
            assert own, "every block keeps its own norms / layer-scales"
            for name in own:
                assert block.get_parameter(name).data_ptr() != first.get_parameter(name).data_ptr()


@CASES
def test_parameter_delta_is_exactly_shared_minus_transforms(builder, groups, channels):
    dense = builder()
    model = shared_model(builder, groups)
    tower = find_vision_tower(dense)
    heads, hidden, kernel = tower.num_heads, tower.hidden_size, 3
    removed = sum(
        p.numel() for g in groups for i in g[1:] for part in (tower.attention(i), tower.mlp(i)) for p in part.parameters()
    )
    added = sum(len(g) for g in groups) * (2 * heads * heads + hidden * kernel * kernel + hidden)
    assert unique_params(dense) - unique_params(model) == removed - added
    report = accounting(model, find_vision_tower(model))
    assert (report.params_before, report.params_after) == (unique_params(dense), unique_params(model))
    assert report.bytes_before - report.bytes_after == 4 * (removed - added)  # float32


@CASES
def test_identity_start_equals_original_with_first_block_copied(builder, groups, channels):
    reference = builder()
    tower = find_vision_tower(reference)
    for group in groups:
        for index in group[1:]:
            tower.attention(index).load_state_dict(tower.attention(group[0]).state_dict())
            tower.mlp(index).load_state_dict(tower.mlp(group[0]).state_dict())
    model = shared_model(builder, groups)
    torch.testing.assert_close(outputs(model, channels), outputs(reference, channels), rtol=1e-5, atol=1e-5)
    for index in (i for g in groups for i in g):  # the same kernel as the shared blocks: bit-identical
        use_eager_attention(tower.attention(index))
    assert torch.equal(outputs(model, channels), outputs(reference, channels))
    assert not torch.equal(outputs(builder(), channels), outputs(model, channels)), "sharing must change the model"


def test_eager_switch_is_local_to_blocks_with_head_mixing():
    model = shared_model(tiny_vit, [[1, 2]])
    tower = find_vision_tower(model)
    implementations = [tower.attention(i).config._attn_implementation for i in range(4)]
    assert implementations == ["sdpa", ATTENTION_IMPLEMENTATION, ATTENTION_IMPLEMENTATION, "sdpa"]
    assert model.config._attn_implementation == "sdpa"
    mlp_only = shared_model(tiny_vit, [[1, 2]], transforms=["mlp"])
    tower = find_vision_tower(mlp_only)
    assert all(tower.attention(i).config._attn_implementation == "sdpa" for i in range(4))
    assert not hasattr(tower.attention(1), "minivit_mix") and hasattr(tower.mlp(1), "minivit_conv")


class _Attention(torch.nn.Module):
    pass


def test_head_mixing_acts_on_logits_before_and_on_maps_after_softmax():
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 3, 5, 4, generator=generator) for _ in range(3))
    module = _Attention()
    plain, plain_maps = minivit_attention_forward(module, query, key, value, None)
    module.minivit_mix = HeadMixing(3)
    with torch.no_grad():
        module.minivit_mix.before_softmax.copy_(torch.eye(3)[[2, 0, 1]])  # head h reads the logits of another head
    _, maps = minivit_attention_forward(module, query, key, value, None)
    assert torch.equal(maps, plain_maps[:, [2, 0, 1]])
    with torch.no_grad():
        module.minivit_mix.before_softmax.copy_(2 * torch.eye(3))  # before softmax: a sharper distribution
        module.minivit_mix.after_softmax.copy_(0.5 * torch.eye(3))  # after softmax: a plain rescale of the maps
    _, maps = minivit_attention_forward(module, query, key, value, None)
    sharper = torch.softmax(2 * (query @ key.transpose(2, 3)) * 4**-0.5, dim=-1)
    torch.testing.assert_close(maps, 0.5 * sharper)
    torch.testing.assert_close(maps.sum(-1), torch.full((1, 3, 5), 0.5))
    assert plain.shape == (1, 5, 3, 4)


def test_conv_runs_on_the_2d_patch_grid_and_skips_prefix_tokens():
    grid = PatchGrid()
    grid.shape = (3, 5)  # non-square: 15 patches
    conv = PatchGridConv(channels=2, kernel_size=3, num_prefix_tokens=1, grid=grid)
    with torch.no_grad():
        conv.conv.weight[:, 0, 0, 1] = 1.0  # out[r, c] += in[r - 1, c]: the patch one ROW up
    tokens = torch.randn(1, 16, 2)
    out = conv(tokens)
    assert torch.equal(out[:, 0], tokens[:, 0]), "the CLS token bypasses the conv"
    patches = tokens[:, 1:].view(1, 3, 5, 2)
    expected = patches.clone()
    expected[:, 1:] += patches[:, :-1]  # 5 tokens back in the flattened sequence, out of reach of a 1-D kernel 3
    torch.testing.assert_close(out[:, 1:], expected.view(1, 15, 2))


def test_grid_comes_from_the_patch_embedding_for_non_square_images():
    model = shared_model(tiny_vit, [[0, 1]])
    tower = find_vision_tower(model)
    with torch.no_grad():
        tower.mlp(1).minivit_conv.conv.weight.normal_()
        model(pixel_values=torch.randn(1, 1, 28, 42), interpolate_pos_encoding=True)
    assert tower.patch_embedding.minivit_grid.shape == (4, 6)


def test_a_deep_copy_keeps_its_own_grid_and_transforms():
    model = shared_model(tiny_vit, [[0, 1]])
    twin = copy.deepcopy(model)
    tower, twin_tower = find_vision_tower(model), find_vision_tower(twin)
    assert twin_tower.mlp(1).minivit_conv.grid is twin_tower.patch_embedding.minivit_grid
    assert twin_tower.mlp(1).minivit_conv.grid is not tower.patch_embedding.minivit_grid
    assert torch.equal(outputs(twin, 1), outputs(model, 1))


def test_sharing_twice_is_refused():
    model = shared_model(tiny_vit, [[0, 1]])
    with pytest.raises(ValueError, match=r"already applied to block\(s\) \[1\]"):
        share_blocks(find_vision_tower(model), [[1, 2]], TRANSFORMS, 3)
    share_blocks(find_vision_tower(model), [[2, 3]], TRANSFORMS, 3)  # other blocks: fine
    assert shared_groups(find_vision_tower(model)) == [[0, 1], [2, 3]]
