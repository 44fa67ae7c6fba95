"""riverone_hf.stages.targeting: peft-style selection of Linears (one regex string, fullmatch; a list of names
or dotted suffixes), the ValueError naming the config field, ownership by earlier stages through parent
modules, and tied weights."""

import re

import pytest
import torch
from torch import nn

from riverone_hf.stages.targeting import is_claimed, modules_matching, tied_module_names
from tests.tiny_models import tiny_qwen3


def qwen3_linears(**overrides) -> dict[str, nn.Linear]:
    """The Linears of a tiny 2-layer Qwen3 skeleton (meta device: names only)."""
    with torch.device("meta"):
        model = tiny_qwen3(**overrides)
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


LAYER_0_MLP = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
DOWN = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize(
    "regex, expected",
    [
        (r"model\.layers\.\d+\.mlp\.down_proj", DOWN),
        (r"model\.layers\.0\.mlp\..*", LAYER_0_MLP),
        (r"lm_head", ["lm_head"]),
        (r"model\.layers\.1\.mlp\.down_proj|.*\.down_proj", DOWN),  # once each, in the model's order
        (r".*\.[qkvo]_proj", [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]),
    ],
    ids=["down-every-layer", "one-block-mlp", "lm-head", "overlapping-alternatives-once-in-model-order", "attention"],
)
def test_one_string_is_a_regex_fullmatched_on_full_names(regex, expected):
    assert modules_matching(qwen3_linears(), regex, "aqlm.target_modules") == expected


@pytest.mark.parametrize(
    "names, expected",
    [
        (["down_proj"], DOWN),  # what a peft user writes
        (["mlp.down_proj"], DOWN),
        (["model.layers.0.mlp.down_proj"], DOWN[:1]),  # an exact full name
        (["0.mlp.gate_proj", "0.mlp.up_proj", "layers.0.mlp.down_proj"], LAYER_0_MLP),
        (["layers.1.mlp.down_proj", "down_proj"], DOWN),  # once each, in the model's order
        (["lm_head"], ["lm_head"]),
    ],
    ids=["bare-name", "dotted-suffix", "exact-name", "several-suffixes", "overlap-once-in-model-order", "lm-head"],
)
def test_a_list_names_modules_exactly_or_by_dotted_suffix(names, expected):
    assert modules_matching(qwen3_linears(), names, "aqlm.target_modules") == expected


@pytest.mark.parametrize(
    "regex",
    [r"down_proj", r"model\.layers\.0", r"model\.embed_tokens"],
    ids=["substring-is-not-enough", "block-prefix", "embedding-not-linear"],
)
def test_a_regex_that_matches_nothing_names_the_field_and_the_regex(regex):
    message = f"`vqc.target_modules` regular expression {regex!r} matches no Linear"
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        modules_matching(qwen3_linears(), regex, "vqc.target_modules")
    assert "fullmatch" in str(error.value) and "model.layers.0.self_attn.q_proj" in str(error.value)  # examples


@pytest.mark.parametrize(
    "names, unmatched",
    [
        (["own_proj"], "own_proj"),  # a suffix only at a dot boundary
        (["model.layers.0"], "model.layers.0"),  # a block, not a Linear
        (["down_proj", "layers.9.mlp.down_proj"], "layers.9.mlp.down_proj"),  # one of two unmatched
        (["embed_tokens"], "embed_tokens"),  # an Embedding, not a Linear
    ],
    ids=["not-at-a-dot", "block", "one-of-two-unmatched", "embedding-not-linear"],
)
def test_a_list_entry_that_names_nothing_names_the_field_and_the_entry(names, unmatched):
    with pytest.raises(ValueError, match=re.escape(f"`vqc.target_modules` entry {unmatched!r} names no Linear")) as error:
        modules_matching(qwen3_linears(), names, "vqc.target_modules")
    assert "ONE string" not in str(error.value)  # no regex hint for a plain name


def test_a_regex_in_a_list_says_to_pass_one_string():
    """Before peft's convention a list held regexes; such a list now matches nothing and says why."""
    with pytest.raises(ValueError, match=r"ONE string for a regular expression"):
        modules_matching(qwen3_linears(), [r"model\.layers\.\d+\.mlp\.down_proj"], "aqlm.target_modules")


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
