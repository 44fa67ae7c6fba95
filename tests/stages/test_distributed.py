"""Multi-process calibrated AQLM: under `torchrun --nproc_per_node 2` (two real gloo ranks on CPU) the Linears
of each block are split across the ranks and broadcast, and every rank ends with exactly the model that one
process computes (same codes, codebooks, scales, norms), true-sequential and block fine-tuning included."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_quantize.py")
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


def run_ranks(nproc: int, out_dir) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", SCRIPT, str(out_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [load_file(os.path.join(out_dir, f"rank{r}.safetensors")) for r in range(nproc)]


def one_process() -> dict:
    """The same run in this process (no process group), with one thread as each torchrun rank has."""
    from tests.stages.distributed_quantize import quantize_tiny

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return quantize_tiny().state_dict()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # two fresh Python processes importing transformers: ~15 s on an idle 2-core box
@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed")
def test_two_ranks_give_the_one_process_model(tmp_path):
    ranks = run_ranks(2, tmp_path)
    single = one_process()
    assert [int(r["world_size"]) for r in ranks] == [2, 2]  # two real ranks, not two independent processes
    linears = sum(k.endswith("codes") for k in single)
    assert linears == 15  # 2 blocks x 7 + lm_head
    here = [int(r["quantized_here"]) for r in ranks]
    assert sum(here) == linears and min(here) > 0  # the work was split, each Linear quantized once
    for state in ranks:
        assert state.keys() - {"world_size", "quantized_here"} == single.keys()
        for key, value in single.items():
            assert state[key].equal(value), key
