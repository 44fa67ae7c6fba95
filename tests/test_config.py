"""RiverOneConfig / AqlmSpec: round trips, registration, and one clear error per bad field."""

import importlib
import json

import pytest
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, AutoQuantizationConfig

import riverone_hf
from riverone_hf import AqlmSpec, RiverOneConfig
from riverone_hf.config import load_config_file

FULL = {
    "aqlm": {
        "num_codebooks": 1,
        "nbits_per_codebook": 16,
        "in_group_size": 8,
        "beam_size": 4,
        "calibration": {"text_files": ["a.txt"], "num_samples": 8, "seq_len": 64},
        "target_modules": r".*\.mlp\..*",
        "modules_to_not_convert": ["lm_head"],
        "overrides": [{"pattern": r".*down_proj", "num_codebooks": 2, "nbits_per_codebook": 8}, {"pattern": r".*\.0\..*", "skip": True}],
    }
}


def test_round_trip_dict_and_json(tmp_path):
    config = RiverOneConfig(**FULL)
    data = config.to_dict()
    assert data["quant_method"] == "riverone"
    again = RiverOneConfig.from_dict(json.loads(json.dumps(data)))
    assert again == config
    assert isinstance(again.aqlm, AqlmSpec) and again.aqlm.calibration.num_samples == 8
    path = tmp_path / "q.json"
    config.to_json_file(path)
    assert AutoQuantizationConfig.from_dict(json.loads(path.read_text())) == config


def test_yaml_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("aqlm:\n  num_codebooks: 2\n  nbits_per_codebook: 8\n  overrides:\n    - {pattern: '.*q_proj', skip: true}\n")
    config = load_config_file(str(path))
    assert config.aqlm.num_codebooks == 2 and config.aqlm.overrides[0].skip


def test_overrides_resolve_first_match():
    spec = RiverOneConfig(**FULL).aqlm
    assert spec.for_module("model.layers.0.mlp.up_proj") is None  # only the skip rule matches
    down = spec.for_module("model.layers.3.mlp.down_proj")
    assert (down.num_codebooks, down.nbits_per_codebook, down.beam_size) == (2, 8, 4)
    assert spec.for_module("model.layers.3.mlp.up_proj") is spec


BAD = [
    ({"num_codebooks": 0}, "num_codebooks"),
    ({"nbits_per_codebook": 17}, "nbits_per_codebook"),
    ({"in_group_size": "8"}, "in_group_size"),
    ({"out_group_size": 0}, "out_group_size"),
    ({"beam_size": 0}, "beam_size"),
    ({"max_epochs": -1}, "max_epochs"),
    ({"steps_per_epoch": 1.5}, "steps_per_epoch"),
    ({"relative_tolerance": 1.0}, "relative_tolerance"),
    ({"codebook_lr": 0}, "codebook_lr"),
    ({"kmeans_iters": -2}, "kmeans_iters"),
    ({"codebook_optimizer": "sgd"}, "codebook_optimizer"),
    ({"seed": -1}, "seed"),
    ({"calibration": {}}, "calibration"),
    ({"calibration": {"text_files": ["a"], "dataset_path": "d"}}, "calibration"),
    ({"calibration": {"text_files": ["a"], "num_samples": 0}}, "calibration.num_samples"),
    ({"calibration": {"text_files": ["a"], "seq_len": 1}}, "calibration.seq_len"),
    ({"calibration": {"text_files": ["a"], "bogus": 1}}, "bogus"),
    ({"target_modules": 3}, "target_modules"),
    ({"target_modules": []}, "target_modules"),
    ({"target_modules": [""]}, "target_modules"),
    ({"target_modules": "("}, "target_modules"),
    ({"modules_to_not_convert": [1]}, "modules_to_not_convert"),
    ({"overrides": [{"pattern": "x"}]}, "skip"),
    ({"overrides": [{"pattern": "x", "skip": True, "num_codebooks": 1}]}, "skip"),
    ({"overrides": [{"pattern": "x", "nbits_per_codebook": 0}]}, "nbits_per_codebook"),
    ({"overrides": [{"pattern": "[", "skip": True}]}, "pattern"),
    ({"num_codebook": 2}, "num_codebook"),
]


@pytest.mark.parametrize("fields,named", BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_aqlm_field_names_it(fields, named):
    with pytest.raises(ValueError, match=named):
        RiverOneConfig(aqlm=fields)


def test_bad_top_level():
    with pytest.raises(ValueError, match="at least one stage"):
        RiverOneConfig()
    with pytest.raises(ValueError, match="unknown field"):
        RiverOneConfig(aqlm={}, minivitt={})
    with pytest.raises(ValueError, match="version"):
        RiverOneConfig(aqlm={}, version=99)


def test_registration_is_idempotent():
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["riverone"] is RiverOneConfig
    importlib.reload(riverone_hf)
    importlib.reload(riverone_hf)
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["riverone"].__name__ == "RiverOneConfig"
    assert AUTO_QUANTIZER_MAPPING["riverone"].__name__ == "RiverOneHfQuantizer"


BAD_OTHER_STAGES = [
    ({"minivit": {}}, "exactly one of `groups` or `share_every`"),
    ({"minivit": {"groups": [[0, 1]], "share_every": 2}}, "exactly one"),
    ({"minivit": {"groups": [[0]]}}, "minivit.groups"),
    ({"minivit": {"groups": [[0, 2]]}}, "adjacent"),
    ({"minivit": {"groups": [[0, 1], [1, 2]]}}, "overlap"),
    ({"minivit": {"share_every": 1}}, "minivit.share_every"),
    ({"minivit": {"share_every": 2, "transforms": ["values"]}}, "minivit.transforms"),
    ({"minivit": {"share_every": 2, "conv_kernel_size": 4}}, "conv_kernel_size"),
    ({"minivit": {"share_every": 2, "start": 4, "end": 2}}, "minivit.end"),
    ({"vqc": {}}, "vqc.target_modules"),
    ({"vqc": {"target_modules": "("}}, "vqc.target_modules"),
    ({"vqc": {"target_modules": ["x"], "n_wires": 40}}, "vqc.n_wires"),
    ({"vqc": {"target_modules": ["x"], "rank": 0}}, "vqc.rank"),
    ({"vqc": {"target_modules": ["x"], "noise_probability": 1.5}}, "vqc.noise_probability"),
    ({"vqc": {"target_modules": ["x"], "init": "zeros"}}, "vqc.init"),
]


@pytest.mark.parametrize("fields,named", BAD_OTHER_STAGES, ids=[str(i) for i in range(len(BAD_OTHER_STAGES))])
def test_bad_minivit_and_vqc_fields_name_them(fields, named):
    with pytest.raises(ValueError, match=named.replace("`", ".")):
        RiverOneConfig(**fields)


def test_minivit_groups_resolve_and_check_range():
    spec = RiverOneConfig(minivit={"share_every": 2, "start": 1}).minivit
    assert spec.resolve_groups(6) == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="has 4 blocks"):
        RiverOneConfig(minivit={"groups": [[3, 4]]}).minivit.resolve_groups(4)


def test_all_stages_round_trip():
    config = RiverOneConfig(aqlm={}, minivit={"groups": [[0, 1]]}, vqc={"target_modules": r".*fc2", "n_wires": 6})
    assert RiverOneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# Found by fuzzing (issue 14): each must be a ValueError naming the field, never another exception type.
VQC_ENTRY = {"stage": "vqc", "in_features": 8, "out_features": 8, "bias": True, "n_wires": 2, "n_layers": 1,
             "rank": 2, "hidden_size": 4, "chunk_size": 8, "noise_probability": 0.0, "exact_noise": False, "report": {}}
HOSTILE = [
    ({"aqlm": {"overrides": [{"skip": True}]}}, "pattern"),  # was TypeError
    ({"aqlm": {"target_modules": "a{4294967296}"}}, "target_modules"),  # was OverflowError
    ({"aqlm": {"target_modules": "(" * 2000 + ")" * 2000}}, "target_modules"),  # was RecursionError
    ({"aqlm": {"target_modules": "(?:" * 60 + "a" + ")" * 60}}, "target_modules"),  # nesting guard
    ({"aqlm": {"modules_to_not_convert": ["("]}}, "modules_to_not_convert"),  # was accepted, re.error at load
    ({"aqlm": {"modules_to_not_convert": ["x(?i)"]}}, "modules_to_not_convert"),  # breaks transformers' wrapper
    ({"aqlm": {"seed": 2**64}}, "seed"),
    ({"aqlm": {"codebook_lr": 10**400}}, "codebook_lr"),  # was OverflowError
    ({"aqlm": {"relative_tolerance": float("nan")}}, "relative_tolerance"),
    ({"aqlm": {"calibration": {"text_files": [b"a.txt"]}}}, "calibration.text_files"),
    ({"aqlm": {"calibration": {"text_files": ["a\ud800"]}}}, "calibration.text_files"),
    ({"aqlm": {"calibration": {"text_files": ["a.txt"], "tokenizer": float("nan")}}}, "calibration.tokenizer"),
    ({"aqlm": {"overrides": [{b"pattern": "x"}]}}, "overrides"),
    ({"aqlm": {"codebook_optimizer": {}}}, "codebook_optimizer"),
    ({"minivit": {"share_every": 2**70}}, "minivit.share_every"),
    ({"minivit": {"groups": [[2**70, 2**70 + 1]]}}, "minivit.groups"),
    ({"vqc": {"target_modules": ["x"], "seed": 2**63}}, "vqc.seed"),
    ({"quantization_map": {"m": {"stage": "aqlm"}}}, r"quantization_map\['m'\].*num_codebooks"),
    ({"quantization_map": {"m": {"stage": "aqlm", "num_codebooks": "2", "nbits_per_codebook": 8,
                                 "in_group_size": 8, "out_group_size": 1}}}, r"quantization_map\['m'\].*num_codebooks"),
    ({"quantization_map": {"m": []}}, r"quantization_map\['m'\]"),
    ({"quantization_map": {"m": {"stage": ["aqlm"]}}}, r"quantization_map\['m'\]\.stage"),
    ({"quantization_map": {"m": {"stage": "minivit", "group": [0, 1]}}}, r"quantization_map\['m'\].*transforms"),
    ({"quantization_map": {"m": {"stage": "minivit", "group": [0, 2], "transforms": [], "conv_kernel_size": 3}}},
     r"quantization_map\['m'\].*adjacent"),
    ({"quantization_map": {"m": {"stage": "minivit", "group": [0, 1], "transforms": ["x"], "conv_kernel_size": 3}}},
     r"quantization_map\['m'\].*transforms"),
    ({"quantization_map": {"m": {"stage": "vqc", "in_features": 8}}}, r"quantization_map\['m'\].*out_features"),
    ({"quantization_map": {"m": {**VQC_ENTRY, "n_wires": 10**6}}}, r"quantization_map\['m'\].*n_wires"),
    ({"quantization_map": {"m": {**VQC_ENTRY, "in_features": "8"}}}, r"quantization_map\['m'\]\.in_features"),
    ({"quantization_map": {"m": {**VQC_ENTRY, "bias": 1}}}, r"quantization_map\['m'\]\.bias"),
]


@pytest.mark.parametrize("fields,named", HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_hostile_values_raise_value_error_naming_the_field(fields, named):
    with pytest.raises(ValueError, match=named):
        RiverOneConfig(**fields)


@pytest.mark.parametrize("aqlm, named", [
    ({"overrides": [{"pattern": r"model\.layers\.7\..*", "skip": True}]}, "overrides"),
    ({"modules_to_not_convert": ["no_such_module"]}, "modules_to_not_convert"),
    ({"target_modules": r".*nope"}, "target_modules"),
    ({"target_modules": ["nope"]}, "target_modules"),
])
def test_patterns_that_match_nothing_raise_at_plan_time(aqlm, named):
    import torch
    from transformers import AutoModelForCausalLM

    from riverone_hf.stages.aqlm import plan_modules
    from tests.tiny_models import qwen3_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(qwen3_config())
    with pytest.raises(ValueError, match=named):
        plan_modules(model, RiverOneConfig(aqlm=aqlm).aqlm)
