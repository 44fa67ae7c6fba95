"""PV-Tuning under FSDP2: with every decoder layer `fully_shard`-ed over 2 gloo CPU ranks (codes stay int8
DTensors), two P+V steps give the codes (exactly) and parameters (allclose) of one process on the global batch."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = os.path.join(os.path.dirname(__file__), "fsdp_pv_steps.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.mark.slow  # two fresh Python processes importing transformers
@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed")
def test_fsdp2_two_ranks_equal_one_process(pv_dirs, tmp_path):
    from tests.training.fsdp_pv_steps import pv_steps

    _, quantized = pv_dirs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    done = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", SCRIPT, quantized,
                           str(tmp_path / "fsdp.safetensors")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = load_file(tmp_path / "fsdp.safetensors")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = pv_steps(quantized, sharded=False)
    finally:
        torch.set_num_threads(threads)
    start = load_file(os.path.join(quantized, "model.safetensors"))
    assert sharded.keys() == single.keys()
    moved = 0
    for key, value in single.items():
        if value.is_floating_point():
            torch.testing.assert_close(sharded[key], value, rtol=1e-4, atol=1e-6, msg=key)
        else:
            assert torch.equal(sharded[key], value), key
            moved += int((value != start[key]).sum())
    assert moved > 0  # the V-step changed codes, identically in both runs
