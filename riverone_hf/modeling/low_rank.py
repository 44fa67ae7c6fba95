"""Low-rank algebra shared by the VQC generator's fit and its truncated-SVD baseline.

Objective of both: the relative error of a reconstruction Ŵ of W [out, in],
    ||(W - Ŵ) L||² / ||W L||²   with L Lᵀ = xtx (XᵀX / n of calibration inputs, lightly damped),
or the weight error ||W - Ŵ||² / ||W||² when xtx is None (L = I). For Ŵ = U Vᵀ this is evaluated
without forming Ŵ: ||T - U V'ᵀ||² = ||T||² - 2 <U, T V'> + <UᵀU, V'ᵀV'> with T = W L, V' = Lᵀ V.
"""

from __future__ import annotations

import torch

DAMPING = 1e-4  # fraction of mean(diag(xtx)) added to the diagonal before the Cholesky factorisation


def whitening_factor(xtx: torch.Tensor | None, damping: float = DAMPING) -> torch.Tensor | None:
    """Lower-triangular L [in, in] with L Lᵀ = xtx + damping * mean(diag(xtx)) * I (float64), or None."""
    if xtx is None:
        return None
    xtx = xtx.detach().double()
    ridge = damping * xtx.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.cholesky(xtx + ridge * torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device))


class LowRankObjective:
    """||(W - U Vᵀ) L||² / ||W L||² as a differentiable function of U [out, r] and V [in, r]."""

    def __init__(self, weight: torch.Tensor, xtx: torch.Tensor | None = None):
        self.factor = whitening_factor(xtx)
        target = weight.detach().double()
        if self.factor is not None:
            target = target @ self.factor
        self.target = target.float()  # T = W L
        self.norm2 = float(target.square().sum())
        if self.norm2 == 0:
            raise ValueError("the weight to fit is all zeros")

    def __call__(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.factor is not None:
            v = self.factor.T.to(v.dtype) @ v  # V' = Lᵀ V
        cross = (u * (self.target @ v)).sum()
        gram = ((u.T @ u) * (v.T @ v)).sum()
        return (self.norm2 - 2 * cross + gram) / self.norm2


@torch.no_grad()
def truncated_svd(weight: torch.Tensor, rank: int, xtx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` U [out, r], V [in, r] (W ≈ U Vᵀ, singular values split evenly) under the
    objective above: the SVD of W L truncated, mapped back through L⁻¹ (Eckart–Young)."""
    factor = whitening_factor(xtx)
    target = weight.detach().double()
    if factor is not None:
        target = target @ factor
    left, values, right_t = torch.linalg.svd(target, full_matrices=False)
    root = values[:rank].sqrt()
    u = left[:, :rank] * root
    v = right_t[:rank].T * root  # [in, r], V'
    if factor is not None:
        v = torch.linalg.solve_triangular(factor.T, v, upper=True)  # V = L⁻ᵀ V'
    return u.float(), v.float()


def svd_rank_for_budget(parameters: int, out_features: int, in_features: int) -> int:
    """The largest rank whose two factors store at most `parameters` numbers (0 if none fits)."""
    return min(parameters // (out_features + in_features), min(out_features, in_features))
