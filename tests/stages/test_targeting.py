"""riverone_hf.stages.targeting: regex (fullmatch) selection of Linears, the ValueError naming the config
field, ownership by earlier stages through parent modules, and tied weights."""

import re

import pytest
import torch
from torch import nn

from riverone_hf.stages.targeting import is_claimed, linears_matching, tied_module_names
from tests.tiny_models import tiny_qwen3


def qwen3_linears(**overrides) -> dict[str, nn.Linear]:
    """The Linears of a tiny 2-layer Qwen3 skeleton (meta device: names only)."""
    with torch.device("meta"):
        model = tiny_qwen3(**overrides)
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


LAYER_0_MLP = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
DOWN = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize(
    "patterns, expected",
    [
        ([r"model\.layers\.\d+\.mlp\.down_proj"], DOWN),
        ([r"model\.layers\.0\.mlp\..*"], LAYER_0_MLP),
        ([r"lm_head"], ["lm_head"]),
        # names come once each, in the model's order, whatever the order and overlap of the patterns
        ([r"model\.layers\.1\.mlp\.down_proj", r".*\.down_proj"], DOWN),
        ([r".*\.[qkvo]_proj"], [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]),
    ],
    ids=["down-every-layer", "one-block-mlp", "lm-head", "overlapping-patterns-once-in-model-order", "attention"],
)
def test_selection_by_fullmatch(patterns, expected):
    assert linears_matching(qwen3_linears(), patterns, "aqlm.target_modules") == expected


@pytest.mark.parametrize(
    "patterns, unmatched",
    [
        ([r"down_proj"], r"down_proj"),  # would match with re.search, not with re.fullmatch
        ([r"model\.layers\.0"], r"model\.layers\.0"),  # a block, not a Linear (and a prefix of names)
        ([r"model\.layers\.\d+\.mlp\.down_proj", r"model\.layers\.9\..*"], r"model\.layers\.9\..*"),
        ([r"model\.embed_tokens"], r"model\.embed_tokens"),  # an Embedding, not a Linear
    ],
    ids=["substring-is-not-enough", "block-prefix", "one-of-two-patterns-unmatched", "embedding-not-linear"],
)
def test_a_pattern_that_matches_nothing_names_the_field_and_the_pattern(patterns, unmatched):
    message = f"`vqc.target_modules` pattern {unmatched!r} matches no Linear"
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        linears_matching(qwen3_linears(), patterns, "vqc.target_modules")
    assert "fullmatch" in str(error.value) and "model.layers.0.self_attn.q_proj" in str(error.value)  # examples


def test_no_patterns_select_nothing():
    assert linears_matching(qwen3_linears(), [], "aqlm.target_modules") == []


@pytest.mark.parametrize(
    "name, claimed, expected",
    [
        ("model.layers.0.mlp.up_proj", {"model.layers.0.mlp.up_proj"}, True),
        ("model.layers.0.mlp.up_proj", {"model.layers.0"}, True),
        ("model.layers.0.mlp.up_proj", {"model"}, True),
        ("model.layers.0.mlp.up_proj", {"model.layers.1", "lm_head"}, False),
        ("model.layers.10.mlp.up_proj", {"model.layers.1"}, False),
        ("model.layers.0", {"model.layers.0.mlp.up_proj"}, False),
        ("model.layers.0.mlp.up_proj", set(), False),
    ],
    ids=[
        "itself", "parent-block", "grandparent", "other-modules", "string-prefix-is-not-a-parent",
        "child-does-not-claim-parent", "nothing-claimed",
    ],
)
def test_is_claimed_by_itself_or_a_parent(name, claimed, expected):
    assert is_claimed(name, claimed) is expected


@pytest.mark.parametrize(
    "tie, expected",
    [(True, {"lm_head", "model.embed_tokens"}), (False, set())],
    ids=["tied-embeddings", "untied"],
)
def test_tied_module_names_on_qwen3(tie, expected):
    model = tiny_qwen3(tie_word_embeddings=tie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    assert tied_module_names(model) == expected


def test_a_module_without_tied_weights_keys_has_no_tied_modules():
    assert tied_module_names(nn.Sequential(nn.Linear(2, 2))) == set()
