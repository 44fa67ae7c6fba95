"""`riverone_hf.add_stages`: stages added one by one to a loaded riverone model give the same model as one
`from_pretrained` with all of them, save and reload as one checkpoint, and refuse what they cannot do before
changing a weight."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from riverone_hf import RiverOneConfig, add_stages
from tests.tiny_models import FAST_AQLM, input_ids, pixel_values, save_dense, tiny_internvl

SCHEME = {"num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 8}
FAST_VQC = {"n_wires": 2, "n_layers": 1, "rank": 2, "hidden_size": 4, "chunk_size": 8, "init_steps": 3,
            "baselines": False}
STAGES = {"minivit": {"groups": [[0, 1]]},
          "vqc": {"target_modules": ["language_model.layers.0.mlp.down_proj"], **FAST_VQC},
          "aqlm": {**SCHEME, **FAST_AQLM}}


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory) -> str:
    return save_dense(tiny_internvl(), tmp_path_factory.mktemp("internvl") / "dense")


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        pixels = pixel_values(batch=2, channels=3)
        ids = torch.cat([torch.full((2, 1), model.config.image_token_id), input_ids(length=8)], dim=1)
        return model(input_ids=ids, pixel_values=pixels).logits


def stacked(internvl_dir):
    model = AutoModelForImageTextToText.from_pretrained(internvl_dir,
                                                        quantization_config=RiverOneConfig(minivit=STAGES["minivit"]))
    add_stages(model, RiverOneConfig(vqc=STAGES["vqc"]))
    add_stages(model, RiverOneConfig(aqlm=STAGES["aqlm"]))
    return model


def test_stages_added_one_by_one_equal_one_pass_and_reload(internvl_dir, tmp_path):
    one_pass = AutoModelForImageTextToText.from_pretrained(internvl_dir, quantization_config=RiverOneConfig(**STAGES))
    model = stacked(internvl_dir)
    assert model.config.quantization_config.quantization_map == one_pass.config.quantization_config.quantization_map
    assert {e["stage"] for e in model.config.quantization_config.quantization_map.values()} == set(STAGES)
    ours, theirs = model.state_dict(), one_pass.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(outputs(model), outputs(one_pass))

    model.save_pretrained(tmp_path / "stacked")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "stacked")
    assert torch.equal(outputs(again), outputs(model))


def test_a_stage_added_to_a_reloaded_checkpoint(internvl_dir, tmp_path):
    """Resume: a saved MiniViT checkpoint, reloaded, takes the next stage like the live model does."""
    live = AutoModelForImageTextToText.from_pretrained(internvl_dir,
                                                       quantization_config=RiverOneConfig(minivit=STAGES["minivit"]))
    live.save_pretrained(tmp_path / "minivit")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "minivit")
    for model in (live, reloaded):
        add_stages(model, RiverOneConfig(aqlm=STAGES["aqlm"]))
    assert torch.equal(outputs(reloaded), outputs(live))


def test_refusals_change_nothing(internvl_dir, qwen3_dir):
    dense = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    with pytest.raises(ValueError, match="not loaded through riverone"):
        add_stages(dense, RiverOneConfig(aqlm=STAGES["aqlm"]))

    model = AutoModelForImageTextToText.from_pretrained(internvl_dir,
                                                        quantization_config=RiverOneConfig(minivit=STAGES["minivit"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already went through the `minivit` stage"):
        add_stages(model, RiverOneConfig(minivit=STAGES["minivit"]))
    # the second stage's target is wrong: the first (valid) one must not have run either
    bad = RiverOneConfig(vqc=STAGES["vqc"], aqlm={**STAGES["aqlm"], "target_modules": ["no_such_proj"]})
    with pytest.raises(ValueError, match="'no_such_proj' names no Linear"):
        add_stages(model, bad)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert {e["stage"] for e in model.config.quantization_config.quantization_map.values()} == {"minivit"}
