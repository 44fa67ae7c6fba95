"""recipes/pv_tune.py: YAML then CLI precedence, unknown keys, results JSON, and 2 CPU ranks == 1 process."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import riverone_hf  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes", "pv_tune.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_recipe():
    spec = importlib.util.spec_from_file_location("pv_tune_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe_config(pv_dirs, tmp_path_factory):
    dense, quantized = pv_dirs
    root = tmp_path_factory.mktemp("pv_recipe")
    train = root / "train.txt"
    shutil.copy(os.path.join(ROOT, "riverone_hf", "data", "calibration_pride_and_prejudice.txt"), train)
    train.write_text(train.read_text()[:12000])
    config = {
        "model_name_or_path": quantized, "teacher_name_or_path": dense, "train_files": [str(train)],
        "block_size": 32, "max_train_blocks": 16, "held_out_blocks": 4, "ppl_seq_len": 32, "ppl_max_windows": 4,
        "code_lr": 0.2, "max_code_change_per_step": 0.05, "beam_size": 2, "max_steps": 3,
        "per_device_train_batch_size": 4, "learning_rate": 0.003, "train_sampling_strategy": "sequential",
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "use_cpu": True, "disable_tqdm": True,
        "monotonicity_every": 1, "output_dir": str(root / "unused"),
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path), root


def test_yaml_then_cli_precedence_and_unknown_key(recipe_config, tmp_path):
    path, _ = recipe_config
    recipe = load_recipe()
    args, pv_config, training_args = recipe.parse(["--config", path, "--beam_size", "3"])
    assert pv_config.beam_size == 3  # CLI over YAML
    assert pv_config.max_code_change_per_step == 0.05  # YAML over default
    assert pv_config.code_betas == (0.0, 0.95)  # default
    assert training_args.max_steps == 3 and args.block_size == 32
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(open(path)), "beam_sise": 2}))
    with pytest.raises(ValueError, match="beam_sise"):
        recipe.parse(["--config", str(bad)])


def test_two_cpu_ranks_equal_one_process(recipe_config, tmp_path):
    path, root = recipe_config
    recipe = load_recipe()
    one = tmp_path / "one"
    results = recipe.main(*recipe.parse(["--config", path, "--output_dir", str(one)]))
    assert results["world_size"] == 1
    saved = json.loads((one / "pv_results.json").read_text())
    assert {"perplexity_before", "perplexity_after"} <= set(saved["figures"])
    assert saved["monotonicity"]["summary"]["measured_steps"] == 3 and "peak_memory" in saved
    assert (one / "tokenizer.json").is_file()

    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         RECIPE, "--config", path, "--output_dir", str(two), "--per_device_train_batch_size", "2"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((two / "pv_results.json").read_text())["world_size"] == 2
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    quantized = yaml.safe_load(open(path))["model_name_or_path"]
    start = load_file(os.path.join(quantized, "model.safetensors"))
    assert a.keys() == b.keys()
    moved = 0
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key
            if key.endswith(".codes"):
                moved += int((a[key] != start[key]).sum())
    assert moved > 0  # the V-step changed codes, identically in both runs
