"""Honest accounting of a VQC-generated weight: its stored numbers against the dense matrix, and its
error against two baselines at the SAME parameter budget:

- truncated SVD at the largest rank k whose factors fit the generator's budget, k·(in + out) <= budget,
  under the same objective (weight error, or output error through XᵀX);
- the classical ablation: the same hypernetwork fed a learned vector per chunk instead of the circuit
  (`ClassicalGeneratedLinear`), fitted with the same warm start, steps and learning rate. It stores
  n_chunks·n_wires numbers where the circuit stores n_chunks·2^n_wires + 3·n_layers·n_wires, so it is a
  little smaller; if it is as good, the circuit does not help.

Errors are relative squared errors: ||(W - Ŵ) X||² / ||W X||² with XᵀX, else ||W - Ŵ||² / ||W||².
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..aq import relative_output_error
from ..modeling.low_rank import svd_rank_for_budget, truncated_svd
from ..modeling.vqc_linear import ClassicalGeneratedLinear, GeneratedLinear


@dataclass
class LayerAccount:
    """One row of the accounting table (errors are relative squared errors, see module docstring)."""

    name: str
    out_features: int
    in_features: int
    dense_params: int
    vqc_params: int
    vqc_error: float
    svd_rank: int
    svd_params: int
    svd_error: float
    classical_params: int | None = None
    classical_error: float | None = None
    objective: str = "weight"

    def as_dict(self) -> dict:
        return asdict(self)


def svd_baseline(weight: torch.Tensor, budget: int, xtx: torch.Tensor | None = None) -> tuple[int, float]:
    """(rank, relative error) of the truncated SVD that stores at most `budget` numbers."""
    out_features, in_features = weight.shape
    rank = svd_rank_for_budget(budget, out_features, in_features)
    if rank == 0:
        return 0, 1.0
    u, v = truncated_svd(weight, rank, xtx)
    return rank, relative_output_error(weight, u @ v.T, xtx)


def classical_twin(module: GeneratedLinear, seed: int) -> ClassicalGeneratedLinear:
    """The ablation of `module`: same shapes and hypernetwork, learned vectors instead of the circuit."""
    return ClassicalGeneratedLinear(
        module.in_features, module.out_features, bias=False, n_features=module.trunk.weight.shape[1],
        rank=module.rank, hidden_size=module.hidden_size, chunk_size=module.chunk_size, seed=seed,
    )


def account_layer(name: str, module: GeneratedLinear, weight: torch.Tensor, xtx: torch.Tensor | None = None, *,
                  classical: ClassicalGeneratedLinear | None = None) -> LayerAccount:
    """Measure `module` (already fitted) and the baselines against the original `weight` [out, in]."""
    weight = weight.detach().float()
    budget = module.num_generator_parameters()
    rank, svd_error = svd_baseline(weight, budget, xtx)
    out_features, in_features = weight.shape
    return LayerAccount(
        name=name, out_features=out_features, in_features=in_features, dense_params=weight.numel(),
        vqc_params=budget, vqc_error=relative_output_error(weight, module.weight_matrix(), xtx),
        svd_rank=rank, svd_params=rank * (out_features + in_features), svd_error=svd_error,
        classical_params=None if classical is None else classical.num_generator_parameters(),
        classical_error=None if classical is None else relative_output_error(weight, classical.weight_matrix(), xtx),
        objective="weight" if xtx is None else "output (XᵀX)",
    )


def format_accounts(accounts: list[LayerAccount]) -> str:
    """A markdown table of `accounts`."""
    header = ("| layer | out x in | dense params | VQC params (% dense) | VQC rel err | classical-vector params | "
              "classical rel err | SVD rank (params) | SVD rel err | objective |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for a in accounts:
        classical = ("-", "-") if a.classical_error is None else (f"{a.classical_params:,}", f"{a.classical_error:.4f}")
        lines.append(
            f"| {a.name} | {a.out_features}x{a.in_features} | {a.dense_params:,} | {a.vqc_params:,} "
            f"({100 * a.vqc_params / a.dense_params:.2f}%) | {a.vqc_error:.4f} | {classical[0]} | {classical[1]} | "
            f"{a.svd_rank} ({a.svd_params:,}) | {a.svd_error:.4f} | {a.objective} |"
        )
    return "\n".join(lines)
