"""Worker of test_pv_fsdp.py: two PV steps (P-step AdamW + V-step) on the tiny quantized Qwen3; under `torchrun`
every decoder layer and the root are `fully_shard`-ed (FSDP2, gloo on CPU) and each rank trains on its half of
the global batch. Writes the whole (gathered) codes, codebooks, scales and final norm of rank 0 to argv[2]."""

from __future__ import annotations

import sys

import torch


def pv_steps(quantized: str, sharded: bool, steps: int = 2) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    import riverone_hf  # noqa: F401
    from riverone_hf.training import PVTuningConfig, get_pv_model
    from riverone_hf.training.pv import PVOptimizer
    from riverone_hf.training.pv.vstep import whole_tensor

    model = get_pv_model(AutoModelForCausalLM.from_pretrained(quantized),
                         PVTuningConfig(code_lr=0.5, max_code_change_per_step=0.05, beam_size=2))
    rank, world = 0, 1
    if sharded:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        codes = next(iter(model.pv_state.modules.values())).codes
        assert isinstance(codes, DTensor) and codes.dtype == torch.int8  # really sharded, integer dtype kept
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = PVOptimizer(torch.optim.AdamW(trainable, lr=3e-3), model.pv_state)
    ids = torch.randint(1, 97, (4, 24), generator=torch.Generator().manual_seed(0))
    local = ids.chunk(world)[rank]
    for _ in range(steps):
        model(input_ids=local, labels=local).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = {f"{name}.{kind}": whole_tensor(getattr(module, kind)).clone()
             for name, module in model.pv_state.modules.items() for kind in ("codes", "codebooks", "scales")}
    state["model.norm.weight"] = whole_tensor(model.model.norm.weight).clone()
    return state


if __name__ == "__main__":
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    state = pv_steps(sys.argv[1], sharded=True)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, sys.argv[2])
    dist.destroy_process_group()
