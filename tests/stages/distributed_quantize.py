"""Run by tests/stages/test_distributed.py under `torchrun --nproc_per_node N`: the calibrated AQLM flow
(true-sequential + block fine-tuning) on a tiny Qwen3, each rank saving its quantized tensors and the world
size it ran with to OUT_DIR/rank{r}.safetensors."""

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import riverone_hf.stages.aqlm as aqlm_stage  # noqa: E402
from riverone_hf.stages.aqlm import AqlmSpec, plan_modules, quantize_calibrated  # noqa: E402
from tests.tiny_models import FAST_AQLM, tiny_qwen3  # noqa: E402


def quantize_tiny():
    """Tiny Qwen3, every decoder Linear and lm_head quantized with true-sequential + block fine-tuning."""
    model = tiny_qwen3()
    spec = AqlmSpec(num_codebooks=1, nbits_per_codebook=4, **FAST_AQLM, calibration={"text_files": ["unused.txt"]},
                    target_modules=r"model\.layers\.\d\..*_proj|lm_head", true_sequential=True,
                    block_finetune={"enabled": True, "lr": 1e-3, "max_epochs": 2, "relative_tolerance": 0.0})
    windows = torch.randint(1, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    quantize_calibrated(model, plan_modules(model, spec), windows, true_sequential=True, finetune=spec.block_finetune)
    return model


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    here = []  # the Linears this rank quantized itself
    engine = aqlm_stage.quantize_linear
    aqlm_stage.quantize_linear = lambda *args, **kwargs: here.append(1) or engine(*args, **kwargs)
    model = quantize_tiny()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["world_size"] = torch.tensor([dist.get_world_size()])
    tensors["quantized_here"] = torch.tensor([len(here)])
    save_file(tensors, os.path.join(out_dir, f"rank{dist.get_rank()}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
