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
        "target_modules": [r".*\.mlp\..*"],
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
    ({"seed": -1}, "seed"),
    ({"calibration": {}}, "calibration"),
    ({"calibration": {"text_files": ["a"], "dataset_path": "d"}}, "calibration"),
    ({"calibration": {"text_files": ["a"], "num_samples": 0}}, "calibration.num_samples"),
    ({"calibration": {"text_files": ["a"], "seq_len": 1}}, "calibration.seq_len"),
    ({"calibration": {"text_files": ["a"], "bogus": 1}}, "bogus"),
    ({"target_modules": "q_proj"}, "target_modules"),
    ({"target_modules": ["("]}, "target_modules"),
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
