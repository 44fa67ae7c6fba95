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

so the scores of all K candidates are ONE product [beams, go·gi + 1] x [go·gi + 1, K] of the rows
[2s·g', -s²] with the table [codebookᵀ; n] (the Gram terms ride along as an extra row), scored in tiles
that stay in cache (`kmeans.max_inner_product` for a beam of one, a top-k per tile and one merge
otherwise).

Work per input group, with the columns permuted into visiting order: the beam carries
G = residual · H restricted to the columns not visited yet (it shrinks as the search goes), so the
gradient at the group being visited is a slice of G, and leaving a group costs one gather of G by the
surviving hypotheses plus one rank-gi update (the group's residual change times its rows of H). The
search keeps back-pointers (parent hypothesis, chosen code) per step and reads the codes back at the
end, so hypotheses are never copied code by code; the result is checked against the exact objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kmeans import MAX_TILE_COLUMNS, max_inner_product
from .layout import diagonal_blocks

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
    # c H cᵀ = Σ_ab c_a c_b H_ab: one product of the codewords' outer products with the flattened blocks
    outer = (flat[:, :, None] * flat[:, None, :]).reshape(-1, in_group_size * in_group_size)  # [M*K*go, gi²]
    norms = diag_blocks.reshape(diag_blocks.shape[0], -1) @ outer.T  # [I, M*K*go]
    return norms.view(-1, num_codebooks, codebook_size, out_group_size).sum(-1)


def _take(tensor: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """Per output group, pick beams: tensor [c, b, ...], parent [c, b_new] -> [c, b_new, ...] (contiguous)."""
    c, b = tensor.shape[:2]
    flat_index = (parent + torch.arange(c, device=parent.device)[:, None] * b).reshape(-1)
    return (
        tensor.reshape(c * b, *tensor.shape[2:]).index_select(0, flat_index).view(c, parent.shape[1], *tensor.shape[2:])
    )


def _best_candidates(
    rows: torch.Tensor, table: torch.Tensor, bias: torch.Tensor, keep: int, max_chunk_bytes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `keep` best (parent, code) pairs per output group by score rows[c, b] · table[:, k] + bias[c, b].

    Args:
        rows: [c, b, dim]; table: [dim, K]; bias: [c, b]; keep: <= b * K.

    Returns:
        score [c, keep], parent [c, keep] in [0, b), code [c, keep] in [0, K).
    """
    c, b, dim = rows.shape
    codebook_size = table.shape[1]
    if keep == 1 and b == 1:
        value, code = max_inner_product(rows.view(c, dim), table, max_chunk_bytes=max_chunk_bytes)
        return (value + bias[:, 0])[:, None], torch.zeros_like(code)[:, None], code[:, None]
    cols = min(codebook_size, MAX_TILE_COLUMNS)
    flat_rows = rows.reshape(c * b, dim)
    scores, parents, codes = [], [], []
    for lo in range(0, codebook_size, cols):
        width = min(cols, codebook_size - lo)
        tile = torch.mm(flat_rows, table[:, lo : lo + width]).view(c, b, width).add_(bias[..., None])
        top, pick = tile.view(c, b * width).topk(min(keep, b * width), dim=-1, sorted=False)  # [c, <= keep]
        parent = torch.div(pick, width, rounding_mode="floor")
        scores.append(top)
        parents.append(parent)
        codes.append(pick - parent * width + lo)
    if len(scores) == 1:
        return scores[0], parents[0], codes[0]
    scores, parents, codes = torch.cat(scores, 1), torch.cat(parents, 1), torch.cat(codes, 1)
    top, pick = scores.topk(keep, dim=-1, sorted=False)
    return top, parents.gather(1, pick), codes.gather(1, pick)


def _search_chunk(
    weight: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    codebooks: torch.Tensor,
    codebooks_t: torch.Tensor,
    xtx: torch.Tensor | None,
    diag_blocks: torch.Tensor | None,
    norms: torch.Tensor,
    cb_order: list[list[int]],
    beam_size: int,
    max_chunk_bytes: int,
) -> torch.Tensor:
    """Beam search for one chunk of output groups, visiting the input groups in their stored order.

    Every (input group, codebook) is visited once, so when it is visited each hypothesis still holds the
    starting code there.

    Args:
        weight: [c, go, in] reference rows of the chunk (columns in visiting order).
        codes: [c, I, M] int64 starting codes (input groups in visiting order).
        scales: [c] float.
        codebooks: [M, K, go*gi]; codebooks_t: [M, go*gi, K] (the same, transposed).
        xtx: [in, in] or None (identity; then I must be 1); diag_blocks: [I, gi, gi] or None.
        norms: [I, M, K] from `_gram_norms`.
        cb_order[i]: codebooks of input group i in visiting order.

    Returns:
        [c, I, M] int64 codes, never worse (by the exactly recomputed loss) than `codes` per output group.
    """
    c, go, width = weight.shape
    _, num_in_groups, num_codebooks = codes.shape
    _, codebook_size, group_dim = codebooks.shape
    in_group_size = group_dim // go
    device = weight.device
    rows = torch.arange(c, device=device)
    flat_codebooks = codebooks.reshape(-1, group_dim)
    offsets = torch.arange(num_codebooks, device=device) * codebook_size

    def parts(group_codes: torch.Tensor) -> torch.Tensor:
        """[..., M] codes of input groups -> [..., go*gi] unscaled sum of their codewords."""
        summed = F.embedding_bag((group_codes + offsets).reshape(-1, num_codebooks), flat_codebooks, mode="sum")
        return summed.view(*group_codes.shape[:-1], group_dim)

    def residual_of(all_codes: torch.Tensor) -> torch.Tensor:
        """[c, I, M] codes -> [c, go, in] residual weight - ŵ."""
        start = parts(all_codes).view(c, num_in_groups, go, in_group_size).transpose(1, 2).reshape(c, go, width)
        return weight - start * scales[:, None, None]

    def losses(residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[c, go, in] residual -> (residual · H [c, go, in], loss per output group [c])."""
        grad = residual if xtx is None else (residual.reshape(c * go, width) @ xtx).view(c, go, width)
        return grad, (grad * residual).sum((1, 2))

    grad_all, loss0 = losses(residual_of(codes))
    remaining = grad_all.unsqueeze(1)  # [c, b, go, in - visited], b = 1 to start with
    loss = loss0.unsqueeze(1)  # [c, b]
    s = scales[:, None]  # [c, 1]
    minus_s2 = scales.square().neg()  # [c]
    back_pointers: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []  # (i, m, parent [c, b], code [c, b])

    for i in range(num_in_groups):
        b = remaining.shape[1]
        grad = remaining[..., :in_group_size].reshape(c, b, group_dim)  # residual H at group i, [c, b, go*gi]
        group_parent = torch.arange(b, device=device).expand(c, b)  # [c, b] into the beam at group start
        group_codes = codes[:, i].unsqueeze(1).expand(c, b, num_codebooks)  # [c, b, M]
        for m in cb_order[i]:
            b = grad.shape[1]
            old = codes[:, i, m]  # [c], the same in every hypothesis (not visited yet)
            old_part = F.embedding(old, codebooks[m]).mul_(s)  # [c, go*gi], scaled
            old_h = old_part if xtx is None else (old_part.view(c, go, in_group_size) @ diag_blocks[i]).view(c, -1)
            grad_without = grad + old_h[:, None]  # [c, b, go*gi]: residual with the (i, m) part taken out, times H
            # loss with the (i, m) part taken out: L + 2 s <g, c_old> + s^2 n_old
            loss_without = loss + 2 * (grad * old_part[:, None]).sum(-1) - (minus_s2 * norms[i, m][old])[:, None]
            # score of code k = -(loss_without - 2 s <g', c_k> + s^2 n_k) = [2 s g', -s^2] . [c_k; n_k] - loss_without
            score_rows = torch.cat([grad_without * (2 * s[:, :, None]), minus_s2[:, None, None].expand(c, b, 1)], -1)
            table = torch.cat([codebooks_t[m], norms[i, m][None]], 0)  # [go*gi + 1, K]
            new_b = min(beam_size, b * codebook_size)
            top_score, parent, new_code = _best_candidates(
                score_rows, table, loss_without.neg(), new_b, max_chunk_bytes
            )
            back_pointers.append((i, m, parent, new_code))
            loss = top_score.neg()
            new_part = F.embedding(new_code, codebooks[m]).mul_(s[:, :, None])  # [c, new_b, go*gi], scaled
            change = old_part[:, None] - new_part  # the residual at group i grows by this
            if xtx is not None:
                change = (change.view(c, new_b, go, in_group_size) @ diag_blocks[i]).view(c, new_b, group_dim)
            if b == 1 and new_b == 1:
                grad = grad + change
                group_codes = group_codes.clone()
            else:
                grad = _take(grad, parent).add_(change)
                group_parent = group_parent.gather(1, parent)
                group_codes = _take(group_codes, parent)
            group_codes[:, :, m] = new_code
        if i + 1 < num_in_groups:
            # leave group i: G over the columns still to visit, for the surviving hypotheses, plus
            # (the residual change at group i) x (rows of H for group i, columns still to visit)
            b_new = group_codes.shape[1]
            lo, hi = i * in_group_size, (i + 1) * in_group_size
            delta = parts(codes[:, i])[:, None] - parts(group_codes)  # [c, b_new, go*gi], unscaled
            delta = delta.mul_(s[:, :, None]).view(c * b_new * go, in_group_size)
            rest = remaining[..., in_group_size:]
            rest = _take(rest, group_parent) if b_new > 1 or b > 1 else rest.contiguous()
            rest.view(c * b_new * go, -1).addmm_(delta, xtx[lo:hi, hi:])
            remaining = rest

    best = loss.argmin(1)  # [c]
    new_codes = codes.clone()
    pointer = best
    for i, m, parent, new_code in reversed(back_pointers):
        new_codes[:, i, m] = new_code[rows, pointer]
        pointer = parent[rows, pointer]
    _, best_loss = losses(residual_of(new_codes))  # exact, [c]
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
            (residual gradients and candidate scores) take about this many bytes; score tiles are
            bounded by it too.

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
        diag_blocks = None
        order = None
        cb_order = [torch.randperm(num_codebooks, generator=generator).tolist()]
    else:
        # visiting order: the input groups with the most input energy (trace of H_ii) first, ties by index
        importance = xtx.diagonal().reshape(num_in_groups, in_group_size).sum(-1)  # [I]
        order = torch.sort(importance, descending=True, stable=True).indices
        cb_order = torch.rand(num_in_groups, num_codebooks, generator=generator).argsort(-1)[order.cpu()].tolist()
        columns = (order[:, None] * in_group_size + torch.arange(in_group_size, device=weight.device)).reshape(-1)
        xtx = xtx.index_select(0, columns).index_select(1, columns)  # [in, in] in visiting order
        problem_weight = weight.index_select(1, columns).reshape(num_out_groups, out_group_size, -1)
        problem_codes = codes.index_select(1, order)
        problem_scales = scales
        diag_blocks = diagonal_blocks(xtx, in_group_size)  # [I, gi, gi], in visiting order
    norms = _gram_norms(codebooks, diag_blocks)  # [I or 1, M, K]

    num_problems, _, width = problem_weight.shape
    bytes_per_group = 4 * beam_size * (2 * out_group_size * width + min(codebook_size, MAX_TILE_COLUMNS))
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
            diag_blocks,
            norms,
            cb_order,
            beam_size,
            max_chunk_bytes,
        )
    if order is not None:
        out = torch.empty_like(out).index_copy_(1, order, out)  # back to the stored order of input groups
    return out.reshape(num_out_groups, num_in_groups, num_codebooks)
