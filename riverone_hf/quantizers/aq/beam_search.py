"""Beam search over additive codes for a fixed set of codebooks and scales.

Objective, per output group o (the groups are independent of each other):

    L_o = sum over the rows r of group o of  (w_r - ŵ_r) H (w_r - ŵ_r)ᵀ,   H = xtx = XᵀX / n

so changing the code of one (input group i, codebook m) moves L_o by an amount that depends on the
whole row through H[:, i-th input group]: the input groups of a row are coupled and are visited one
after another, codebooks innermost (a beam keeps the `beam_size` best partial re-encodings of each
output group). With `xtx=None` (data-free, H = identity) nothing couples different input groups, so
every (output group, input group) pair is searched on its own over its M codebooks: no [in, in]
matrix is built and the residuals are only [group] wide.

For one step, with g' = (residual + s·c_old) H[:, slice_i] and n_k = Σ_rows c_k H_ii c_kᵀ (precomputed
per input group and codebook: the codebook "Gram" terms), the loss of candidate code k is

    L(k) = L - (-2 s <g', c_old> + s² n_old) + (-2 s <g', c_k> + s² n_k)

which needs one [*, in] x [in, group] product per beam and one [*, group] x [group, K] product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_BYTES = 16 * 2**20


def _gram_norms(codebooks: torch.Tensor, diag_blocks: torch.Tensor | None) -> torch.Tensor:
    """Σ_rows c H_ii cᵀ for every code of every codebook and input group.

    Args:
        codebooks: [M, K, out_group_size, in_group_size].
        diag_blocks: [num_in_groups, in_group_size, in_group_size] diagonal blocks of H, or None (identity).

    Returns:
        [num_in_groups, M, K] (num_in_groups = 1 when `diag_blocks` is None).
    """
    num_codebooks, codebook_size, out_group_size, in_group_size = codebooks.shape
    if diag_blocks is None:
        return codebooks.square().sum((-1, -2)).unsqueeze(0)  # [1, M, K]
    flat = codebooks.reshape(-1, in_group_size)  # [M*K*go, gi]
    norms = torch.empty(diag_blocks.shape[0], num_codebooks, codebook_size, dtype=codebooks.dtype, device=codebooks.device)
    for i in range(diag_blocks.shape[0]):
        norms[i] = (flat @ diag_blocks[i]).mul_(flat).sum(-1).view(num_codebooks, codebook_size, out_group_size).sum(-1)
    return norms


def _row_losses(residual: torch.Tensor, xtx: torch.Tensor | None) -> torch.Tensor:
    """[c, go, in] residual -> [c] loss per output group."""
    c, go, width = residual.shape
    flat = residual.reshape(c * go, width)
    if xtx is None:
        return flat.square().sum(-1).view(c, go).sum(-1)
    return (flat @ xtx).mul_(flat).sum(-1).view(c, go).sum(-1)


def _search_chunk(
    weight: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    codebooks: torch.Tensor,
    codebooks_t: torch.Tensor,
    xtx: torch.Tensor | None,
    xtx_cols: torch.Tensor | None,
    diag_blocks: torch.Tensor | None,
    norms: torch.Tensor,
    schedule: list[tuple[int, int]],
    beam_size: int,
) -> torch.Tensor:
    """Beam search for one chunk of output groups.

    Args:
        weight: [c, go, in] reference rows of the chunk.
        codes: [c, I, M] int64 starting codes.
        scales: [c] float.
        codebooks: [M, K, go*gi]; codebooks_t: [M, go*gi, K] (the same, transposed).
        xtx: [in, in] or None; xtx_cols: [I, in, gi] column blocks of xtx; diag_blocks: [I, gi, gi].
        norms: [I, M, K] from `_gram_norms`.
        schedule: (input group, codebook) pairs in visiting order.

    Returns:
        [c, I, M] int64 codes, never worse (by the exactly recomputed loss) than `codes` per output group.
    """
    c, go, width = weight.shape
    _, num_in_groups, num_codebooks = codes.shape
    _, codebook_size, group_dim = codebooks.shape
    in_group_size = group_dim // go
    rows = torch.arange(c, device=weight.device)

    start = F.embedding_bag(
        (codes + torch.arange(num_codebooks, device=codes.device) * codebook_size).view(-1, num_codebooks),
        codebooks.reshape(-1, group_dim),
        mode="sum",
    )  # [c*I, go*gi]
    start = start.view(c, num_in_groups, go, in_group_size).transpose(1, 2).reshape(c, go, width)
    residual0 = weight - start * scales[:, None, None]  # [c, go, in]
    loss0 = _row_losses(residual0, xtx)  # [c]

    beam_codes = codes.unsqueeze(0)  # [b, c, I, M]
    beam_residual = residual0.unsqueeze(0)  # [b, c, go, in]
    beam_loss = loss0.unsqueeze(0)  # [b, c]
    s = scales[None, :, None]  # [1, c, 1]
    s_sq = s.square()
    per_beam = min(beam_size, codebook_size)

    for i, m in schedule:
        b = beam_codes.shape[0]
        lo, hi = i * in_group_size, (i + 1) * in_group_size
        old = beam_codes[:, :, i, m]  # [b, c]
        old_part = F.embedding(old, codebooks[m]).mul_(s)  # [b, c, go*gi], scaled
        if xtx is None:
            grad = beam_residual[..., lo:hi].reshape(b, c, group_dim) + old_part  # [b, c, go*gi]
        else:
            grad = (beam_residual.reshape(-1, width) @ xtx_cols[i]).view(b, c, go, in_group_size)
            grad = (grad + old_part.view(b, c, go, in_group_size) @ diag_blocks[i]).view(b, c, group_dim)
        # loss with the (i, m) part removed: L + 2 s <g', c_old> - s^2 n_old
        loss_without = beam_loss + 2 * (grad * old_part).sum(-1) - s_sq[..., 0] * norms[i, m][old]  # [b, c]
        cand = torch.matmul(grad, codebooks_t[m])  # [b, c, K]
        cand.mul_(-2 * s).add_(s_sq * norms[i, m]).add_(loss_without[..., None])
        if per_beam < codebook_size:
            cand_loss, cand_code = cand.topk(per_beam, dim=-1, largest=False, sorted=False)  # [b, c, per_beam]
        else:
            cand_loss = cand
            cand_code = torch.arange(codebook_size, device=cand.device).expand(b, c, codebook_size)
        pool_loss = cand_loss.permute(1, 0, 2).reshape(c, b * per_beam)
        pool_code = cand_code.permute(1, 0, 2).reshape(c, b * per_beam)
        new_b = min(beam_size, b * per_beam)
        if new_b < b * per_beam:
            new_loss, pick = pool_loss.topk(new_b, dim=-1, largest=False, sorted=False)  # [c, new_b]
        else:
            new_loss, pick = pool_loss, torch.arange(b * per_beam, device=cand.device).expand(c, -1)
        new_code = pool_code.gather(1, pick).T  # [new_b, c]
        parent = torch.div(pick, per_beam, rounding_mode="floor").T  # [new_b, c]

        beam_codes = beam_codes[parent, rows]  # [new_b, c, I, M]
        beam_codes[:, :, i, m] = new_code
        beam_residual = beam_residual[parent, rows]  # [new_b, c, go, in]
        delta = old_part[parent, rows] - F.embedding(new_code, codebooks[m]).mul_(s)  # [new_b, c, go*gi]
        beam_residual[..., lo:hi] += delta.view(new_b, c, go, in_group_size)
        beam_loss = new_loss.T.contiguous()  # [new_b, c]

    best = beam_loss.argmin(0)  # [c]
    best_codes = beam_codes[best, rows]  # [c, I, M]
    best_loss = _row_losses(beam_residual[best, rows], xtx)  # exact, [c]
    keep_old = best_loss >= loss0
    return torch.where(keep_old[:, None, None], codes, best_codes)


@torch.no_grad()
def beam_search_codes(
    weight: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    xtx: torch.Tensor | None = None,
    *,
    beam_size: int,
    generator: torch.Generator,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Re-encode every weight group with a beam search that minimises Σ_rows (w - ŵ) xtx (w - ŵ)ᵀ.

    Args:
        weight: [out_features, in_features] float32, the reference weight.
        codes: [num_out_groups, num_in_groups, num_codebooks] int64 unpacked codes in [0, K) to start from.
        codebooks: [num_codebooks, K, out_group_size, in_group_size] float32.
        scales: [num_out_groups, 1, 1, 1] float32.
        xtx: [in_features, in_features] float32 XᵀX / n, or None for the weight error (no coupling).
        beam_size: hypotheses kept per output group (per weight group when `xtx` is None).
        generator: CPU generator for the visiting order of input groups and codebooks.
        max_chunk_bytes: memory knob: output groups are searched in chunks whose beam tensors
            (residuals and candidate scores) take about this many bytes.

    Returns:
        [num_out_groups, num_in_groups, num_codebooks] int64 codes; per output group the objective is
        never higher than with `codes`.
    """
    num_out_groups, num_in_groups, num_codebooks = codes.shape
    _, codebook_size, out_group_size, in_group_size = codebooks.shape
    group_dim = out_group_size * in_group_size
    codebooks = codebooks.detach()
    flat_codebooks = codebooks.reshape(num_codebooks, codebook_size, group_dim)
    codebooks_t = flat_codebooks.transpose(1, 2).contiguous()  # [M, go*gi, K]
    scales = scales.detach().reshape(num_out_groups)

    if xtx is None:
        # every (output group, input group) pair is its own problem with a single input group
        problem_weight = (
            weight.reshape(num_out_groups, out_group_size, num_in_groups, in_group_size)
            .permute(0, 2, 1, 3)
            .reshape(num_out_groups * num_in_groups, out_group_size, in_group_size)
        )
        problem_codes = codes.reshape(num_out_groups * num_in_groups, 1, num_codebooks)
        problem_scales = scales.repeat_interleave(num_in_groups)
        xtx_cols = diag_blocks = None
        order = torch.randperm(num_codebooks, generator=generator).tolist()
        schedule = [(0, m) for m in order]
    else:
        problem_weight = weight.reshape(num_out_groups, out_group_size, -1)
        problem_codes = codes
        problem_scales = scales
        blocks = xtx.reshape(-1, num_in_groups, in_group_size)  # [in, I, gi]
        xtx_cols = blocks.permute(1, 0, 2).contiguous()  # [I, in, gi]
        diag_blocks = torch.stack([xtx_cols[i, i * in_group_size : (i + 1) * in_group_size] for i in range(num_in_groups)])
        in_order = torch.randperm(num_in_groups, generator=generator).tolist()
        cb_order = torch.rand(num_in_groups, num_codebooks, generator=generator).argsort(-1).tolist()
        schedule = [(i, m) for i in in_order for m in cb_order[i]]
    norms = _gram_norms(codebooks, diag_blocks)  # [I or 1, M, K]

    num_problems, _, width = problem_weight.shape
    per_beam = min(beam_size, codebook_size)
    bytes_per_group = 4 * beam_size * (3 * out_group_size * width + 2 * codebook_size + per_beam * 4)
    chunk = max(1, min(num_problems, max_chunk_bytes // bytes_per_group))
    out = torch.empty_like(problem_codes)
    for lo in range(0, num_problems, chunk):
        hi = min(lo + chunk, num_problems)
        out[lo:hi] = _search_chunk(
            problem_weight[lo:hi],
            problem_codes[lo:hi],
            problem_scales[lo:hi],
            flat_codebooks,
            codebooks_t,
            xtx,
            xtx_cols,
            diag_blocks,
            norms,
            schedule,
            beam_size,
        )
    return out.reshape(num_out_groups, num_in_groups, num_codebooks)
