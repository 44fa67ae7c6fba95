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

which needs one [beams, in] x [in, group] product per input group (its codebooks update g' in place)
and one [beams, group] x [group, K] product per step. The search keeps back-pointers (parent hypothesis,
chosen code) per step and reads the codes back at the end, so hypotheses are never copied code by code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_BYTES = 64 * 2**20


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
    norms = torch.empty(
        diag_blocks.shape[0], num_codebooks, codebook_size, dtype=codebooks.dtype, device=codebooks.device
    )
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


def _take(tensor: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """Per output group, pick beams: tensor [c, b, ...], parent [c, b_new] -> [c, b_new, ...]."""
    c, b = tensor.shape[:2]
    flat_index = (parent + torch.arange(c, device=parent.device)[:, None] * b).reshape(-1)
    return (
        tensor.reshape(c * b, *tensor.shape[2:]).index_select(0, flat_index).view(c, parent.shape[1], *tensor.shape[2:])
    )


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
    in_order: list[int],
    cb_order: list[list[int]],
    beam_size: int,
) -> torch.Tensor:
    """Beam search for one chunk of output groups.

    Every (input group, codebook) is visited once, so when it is visited each hypothesis still holds the
    starting code there. The beam keeps, per step, back-pointers (parent hypothesis, chosen code);
    residuals are re-gathered once per input group, and the codes are read back at the end.

    Args:
        weight: [c, go, in] reference rows of the chunk.
        codes: [c, I, M] int64 starting codes.
        scales: [c] float.
        codebooks: [M, K, go*gi]; codebooks_t: [M, go*gi, K] (the same, transposed).
        xtx: [in, in] or None; xtx_cols: [I, in, gi] column blocks of xtx; diag_blocks: [I, gi, gi].
        norms: [I, M, K] from `_gram_norms`.
        in_order: input groups in visiting order; cb_order[i]: codebooks of input group i in visiting order.

    Returns:
        [c, I, M] int64 codes, never worse (by the exactly recomputed loss) than `codes` per output group.
    """
    c, go, width = weight.shape
    _, num_in_groups, num_codebooks = codes.shape
    _, codebook_size, group_dim = codebooks.shape
    in_group_size = group_dim // go
    device = weight.device
    rows = torch.arange(c, device=device)

    def parts(group_codes: torch.Tensor) -> torch.Tensor:
        """[c, b, M] codes of one input group -> [c, b, go*gi] unscaled sum of their codewords."""
        offsets = torch.arange(num_codebooks, device=device) * codebook_size
        return F.embedding_bag((group_codes + offsets).view(-1, num_codebooks), flat_codebooks, mode="sum").view(
            *group_codes.shape[:2], group_dim
        )

    flat_codebooks = codebooks.reshape(-1, group_dim)
    start = parts(codes).view(c, num_in_groups, go, in_group_size).transpose(1, 2).reshape(c, go, width)
    residual0 = weight - start * scales[:, None, None]  # [c, go, in]
    loss0 = _row_losses(residual0, xtx)  # [c]

    residual = residual0.unsqueeze(1)  # [c, b, go, in], b = 1 to start with
    loss = loss0.unsqueeze(1)  # [c, b]
    s = scales[:, None, None]  # [c, 1, 1]
    back_pointers: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []  # (i, m, parent [c, b], code [c, b])

    for i in in_order:
        lo, hi = i * in_group_size, (i + 1) * in_group_size
        b = residual.shape[1]
        if xtx is None:
            grad = residual[..., lo:hi].reshape(c, b, group_dim)  # residual H[:, slice] with H = I
        else:
            grad = (residual.reshape(-1, width) @ xtx_cols[i]).view(c, b, group_dim)
        group_parent = torch.arange(b, device=device).expand(c, b)  # [c, b] into the beam at group start
        group_codes = codes[:, i].unsqueeze(1).expand(c, b, num_codebooks)  # [c, b, M]
        for m in cb_order[i]:
            b = grad.shape[1]
            old = codes[:, i, m]  # [c], the same in every hypothesis (not visited yet)
            old_part = F.embedding(old, codebooks[m]).mul_(scales[:, None])  # [c, go*gi], scaled
            if xtx is None:
                grad_without = grad + old_part[:, None]  # [c, b, go*gi]
            else:
                grad_without = grad + (old_part.view(c, 1, go, in_group_size) @ diag_blocks[i]).view(c, 1, group_dim)
            # loss with the (i, m) part taken out: L + 2 s <g', c_old> - s^2 n_old
            loss_without = (
                loss
                + 2 * (grad_without * old_part[:, None]).sum(-1)
                - (s[:, :, 0].square() * norms[i, m][old][:, None])
            )
            # gain of code k = -(loss_without - 2 s <g', c_k> + s^2 n_k)
            gain = torch.matmul(grad_without.mul_(2 * s), codebooks_t[m])  # [c, b, K]
            gain.sub_((s[:, :, 0].square() * norms[i, m])[:, None]).sub_(loss_without[..., None])
            pool = gain.view(c, b * codebook_size)
            new_b = min(beam_size, b * codebook_size)
            if new_b == 1 < b * codebook_size:
                top_gain, pick = pool.max(-1, keepdim=True)  # [c, 1]
            elif new_b < b * codebook_size:
                top_gain, pick = pool.topk(new_b, dim=-1, largest=True, sorted=False)  # [c, new_b]
            else:
                top_gain, pick = pool, torch.arange(b * codebook_size, device=device).expand(c, -1)
            parent = torch.div(pick, codebook_size, rounding_mode="floor")  # [c, new_b]
            new_code = pick - parent * codebook_size  # [c, new_b]
            back_pointers.append((i, m, parent, new_code))
            loss = top_gain.neg()
            new_part = F.embedding(new_code, codebooks[m]).mul_(s)  # [c, new_b, go*gi], scaled
            change = old_part[:, None] - new_part  # the residual at slice i grows by this
            if xtx is not None:
                change = (change.view(c, new_b, go, in_group_size) @ diag_blocks[i]).view(c, new_b, group_dim)
            grad = _take(grad, parent).add_(change)
            group_parent = group_parent.gather(1, parent)
            group_codes = _take(group_codes, parent)
            group_codes[:, :, m] = new_code
        residual = _take(residual, group_parent)
        exact = weight[:, None, :, lo:hi] - (parts(group_codes) * s).view(c, -1, go, in_group_size)
        residual[..., lo:hi] = exact

    best = loss.argmin(1)  # [c]
    best_residual = residual[rows, best]  # [c, go, in]
    new_codes = codes.clone()
    pointer = best
    for i, m, parent, new_code in reversed(back_pointers):
        new_codes[:, i, m] = new_code[rows, pointer]
        pointer = parent[rows, pointer]
    best_loss = _row_losses(best_residual, xtx)  # exact, [c]
    keep_old = best_loss >= loss0
    return torch.where(keep_old[:, None, None], codes, new_codes)


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
        in_order = [0]
        cb_order = [torch.randperm(num_codebooks, generator=generator).tolist()]
    else:
        problem_weight = weight.reshape(num_out_groups, out_group_size, -1)
        problem_codes = codes
        problem_scales = scales
        blocks = xtx.reshape(-1, num_in_groups, in_group_size)  # [in, I, gi]
        xtx_cols = blocks.permute(1, 0, 2).contiguous()  # [I, in, gi]
        diag_blocks = torch.stack(
            [xtx_cols[i, i * in_group_size : (i + 1) * in_group_size] for i in range(num_in_groups)]
        )
        in_order = torch.randperm(num_in_groups, generator=generator).tolist()
        cb_order = torch.rand(num_in_groups, num_codebooks, generator=generator).argsort(-1).tolist()
    norms = _gram_norms(codebooks, diag_blocks)  # [I or 1, M, K]

    num_problems, _, width = problem_weight.shape
    bytes_per_group = 4 * beam_size * (3 * out_group_size * width + 2 * codebook_size)  # residuals, scores
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
            in_order,
            cb_order,
            beam_size,
        )
    return out.reshape(num_out_groups, num_in_groups, num_codebooks)
