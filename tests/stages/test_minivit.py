"""from_pretrained with RiverOneConfig(minivit=...) on tiny ViT / InternVL: sharing, quantization_map,
save (each shared tensor once), pre-quantized reload, identity start, errors, composition with AQLM."""

import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, ViTForImageClassification

import riverone_hf  # noqa: F401  (registers quant_method "riverone")
from riverone_hf import AqlmLinear, RiverOneConfig
from riverone_hf.cli.pipeline import stage_reports
from riverone_hf.modeling.minivit import accounting, use_eager_attention
from riverone_hf.modeling.vision_blocks import find_vision_tower
from tests.tiny_models import (
    FAST_AQLM,
    input_ids,
    pixel_values,
    save_dense,
    tiny_internvl,
    tiny_qwen3,
    tiny_vit,
)

GROUPS = [[0, 1], [2, 3]]


@pytest.fixture(scope="module")
def shared_vit(vit_dir, tmp_path_factory):
    model = ViTForImageClassification.from_pretrained(vit_dir, quantization_config=RiverOneConfig(minivit={"groups": GROUPS}))
    out = tmp_path_factory.mktemp("vit") / "shared"
    model.save_pretrained(out)
    return model, str(out)


def logits(model, channels=1):
    with torch.no_grad():
        return model(pixel_values=pixel_values(channels=channels)).logits


def file_tensors(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = f.keys()  # safe_open is not iterable
        return {k: f.get_slice(k).get_shape() for k in keys}, sum(f.get_tensor(k).nbytes for k in keys)


def assert_shared(model, groups):
    tower = find_vision_tower(model)
    for group in groups:
        for index in group[1:]:
            assert tower.attention(index).q_proj.weight is tower.attention(group[0]).q_proj.weight
            assert tower.mlp(index).fc2.bias is tower.mlp(group[0]).fc2.bias
            assert tower.blocks[index].layernorm_before.weight is not tower.blocks[group[0]].layernorm_before.weight


def test_from_pretrained_shares_and_records_every_block(shared_vit):
    model, _ = shared_vit
    assert_shared(model, GROUPS)
    entries = model.config.quantization_config.quantization_map
    assert entries == {
        f"vit.layers.{i}": {"stage": "minivit", "group": g, "transforms": ["attention", "mlp"], "conv_kernel_size": 3}
        for g in GROUPS for i in g
    }
    dense = sum(p.numel() for p in tiny_vit().parameters())
    report = accounting(model, find_vision_tower(model))
    assert report.params_before == dense and report.params_after == sum(p.numel() for p in model.parameters())


def test_save_writes_each_shared_tensor_once(shared_vit, vit_dir):
    model, out = shared_vit
    shapes, tensor_bytes = file_tensors(out)
    report = accounting(model, find_vision_tower(model))
    assert tensor_bytes == report.bytes_after  # every parameter exactly once, nothing else
    # the second block of a group stores only its norms and transforms
    assert all("minivit" in k or "layernorm" in k for k in shapes if ".layer.1." in k or ".layer.3." in k)
    _, dense_bytes = file_tensors(vit_dir)
    assert dense_bytes - tensor_bytes == report.bytes_before - report.bytes_after
    assert os.path.getsize(os.path.join(out, "model.safetensors")) < os.path.getsize(os.path.join(vit_dir, "model.safetensors"))


def test_reload_rebuilds_sharing_before_loading_and_is_identical(shared_vit):
    model, out = shared_vit
    with torch.no_grad():  # make the transforms non-trivial, so the reload has something to get right
        for name, parameter in model.named_parameters():
            if "minivit" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(out)
    again, info = ViTForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_shared(again, GROUPS)
    assert torch.equal(logits(again), logits(model))


def test_identity_start_of_full_model(vit_dir, capsys):
    model = ViTForImageClassification.from_pretrained(vit_dir, quantization_config=RiverOneConfig(minivit={"share_every": 2}))
    assert capsys.readouterr().out == ""  # the library logs; only commands print
    report = "\n".join(stage_reports(model))
    assert "MiniViT stage on vit, groups [[0, 1], [2, 3]]" in report and "parameters after" in report
    reference = tiny_vit()
    tower = find_vision_tower(reference)
    for first, second in GROUPS:
        tower.attention(second).load_state_dict(tower.attention(first).state_dict())
        tower.mlp(second).load_state_dict(tower.mlp(first).state_dict())
        use_eager_attention(tower.attention(first))
        use_eager_attention(tower.attention(second))
    assert torch.equal(logits(model), logits(reference))


def test_dtype_is_honoured_by_the_transforms(vit_dir):
    config = RiverOneConfig(minivit={"groups": [[1, 2]]})
    model = ViTForImageClassification.from_pretrained(vit_dir, quantization_config=config, dtype=torch.bfloat16)
    tower = find_vision_tower(model)
    assert tower.attention(1).minivit_mix.before_softmax.dtype == torch.bfloat16
    assert tower.mlp(2).minivit_conv.conv.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(pixel_values=pixel_values().bfloat16()).logits.dtype == torch.bfloat16


def test_bad_groups_and_models_fail_before_loading(vit_dir, tmp_path):
    with pytest.raises(ValueError, match=r"names block\(s\) \[4, 5\]"):
        ViTForImageClassification.from_pretrained(vit_dir, quantization_config=RiverOneConfig(minivit={"groups": [[4, 5]]}))
    qwen3 = save_dense(tiny_qwen3(), tmp_path / "qwen3")
    with pytest.raises(ValueError, match="no supported vision tower.*internvl_vision"):
        AutoModelForCausalLM.from_pretrained(qwen3, quantization_config=RiverOneConfig(minivit={"share_every": 2}))


def test_composes_with_aqlm_in_one_config(tmp_path):
    path = save_dense(tiny_internvl(), tmp_path / "internvl")
    config = RiverOneConfig(
        aqlm={"num_codebooks": 1, "nbits_per_codebook": 8, "in_group_size": 8, **FAST_AQLM}, minivit={"groups": [[0, 1]]}
    )
    model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=config)
    stages = {}
    for name, entry in model.config.quantization_config.quantization_map.items():
        stages.setdefault(entry["stage"], set()).add(name)
    assert stages["minivit"] == {"model.vision_tower.encoder.layer.0", "model.vision_tower.encoder.layer.1"}
    assert len(stages["aqlm"]) == 14 and all(n.startswith("model.language_model.") for n in stages["aqlm"])
    assert isinstance(model.model.language_model.layers[0].mlp.up_proj, AqlmLinear)
    assert_shared(model, [[0, 1]])
    model.save_pretrained(tmp_path / "both")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "both")
    assert_shared(again, [[0, 1]])
    assert isinstance(again.model.language_model.layers[0].mlp.up_proj, AqlmLinear)
    with torch.no_grad():
        ids, pixels = input_ids(), pixel_values(channels=3)
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
        features = [m.model.vision_tower(pixel_values=pixels).last_hidden_state for m in (model, again)]
    assert torch.equal(*features)


@pytest.mark.parametrize("fields, named", [
    ({"groups": [[0, 1]], "start": 1}, "minivit.start"),
    ({"share_every": 2, "transforms": ["mlp", "mlp"]}, "minivit.transforms"),
], ids=["start-with-groups", "duplicate-transforms"])
def test_spec_refinements_name_the_field(fields, named):
    with pytest.raises(ValueError, match=named):
        RiverOneConfig(minivit=fields)
