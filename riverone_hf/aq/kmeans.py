"""k-means on small vectors, and the residual k-means initialisation of additive codebooks.

Pure functions: tensors in, tensors out, every random draw from an explicit `torch.Generator`.
The memory knob `max_chunk_bytes` bounds the [rows, columns] score tile built per step of the nearest-
centroid search (`max_inner_product`); tiles that stay in cache are what make the search fast, also
over a 65,536-entry codebook. The speed knob of the fit is `tolerance`: stop once an iteration gains less.
(Fitting on a random sample of the groups was tried and left out: it made the fit and the final error worse.)
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_BYTES = 4 * 2**20
MAX_TILE_BYTES = 4 * 2**20  # bound on one score tile, whatever `max_chunk_bytes` says, so that it stays in cache
MAX_TILE_COLUMNS = 4096  # candidates scored per tile: wide enough for few Python steps, narrow enough for cache
ARGMAX_BLOCK = 64  # columns per block of the two-level row maximum (see `row_max`)


def _tile_shape(num_rows: int, num_cols: int, max_chunk_bytes: int) -> tuple[int, int]:
    """(rows, columns) of one float32 score tile: at most `MAX_TILE_COLUMNS` wide and `max_chunk_bytes` /
    `MAX_TILE_BYTES` big, at least one row."""
    cols = min(num_cols, MAX_TILE_COLUMNS)
    return max(1, min(num_rows, min(max_chunk_bytes, MAX_TILE_BYTES) // (4 * cols))), cols


def row_max(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores.max(-1)` (values, first index of the maximum) for a 2-D tensor, computed in two levels.

    torch's CPU max-with-index over the last dimension is not vectorised, unlike the value-only `amax`,
    so: the value-only maximum of every block of `ARGMAX_BLOCK` columns, the first block holding the row
    maximum, then the max-with-index inside that block only. Same result as `scores.max(-1)`, ties included.
    """
    rows, cols = scores.shape
    if cols < 2 * ARGMAX_BLOCK or cols % ARGMAX_BLOCK or not scores.is_contiguous():
        return scores.max(-1)
    num_blocks = cols // ARGMAX_BLOCK
    blocks = scores.view(rows * num_blocks, ARGMAX_BLOCK)
    block = scores.view(rows, num_blocks, ARGMAX_BLOCK).amax(-1).argmax(-1)  # [rows], first block with the max
    inner = blocks.index_select(0, torch.arange(rows, device=scores.device) * num_blocks + block)  # [rows, block]
    value, offset = inner.max(-1)
    return value, block * ARGMAX_BLOCK + offset


@torch.no_grad()
def max_inner_product(
    queries: torch.Tensor, table: torch.Tensor, *, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row, the largest entry of ``queries @ table`` and its column, without building the product.

    The [rows, columns] score tiles are at most `max_chunk_bytes` (and `MAX_TILE_COLUMNS` wide), so a
    search over many candidates (a 65,536-entry codebook) stays in cache.

    Args:
        queries: [num_queries, dim] float.
        table: [dim, num_candidates] float, same dtype.
        max_chunk_bytes: bound on one score tile.

    Returns:
        values [num_queries] and indices [num_queries] int64; ties go to the lowest column.
    """
    num_queries, num_candidates = queries.shape[0], table.shape[1]
    rows, cols = _tile_shape(num_queries, num_candidates, max_chunk_bytes)
    values = torch.empty(num_queries, dtype=queries.dtype, device=queries.device)
    indices = torch.empty(num_queries, dtype=torch.int64, device=queries.device)
    for start in range(0, num_queries, rows):
        block = queries[start : start + rows]
        best_value, best_index = row_max(block @ table[:, :cols])
        for lo in range(cols, num_candidates, cols):
            value, index = row_max(block @ table[:, lo : lo + cols])
            better = value > best_value  # strict: an earlier column keeps a tie
            best_value = torch.where(better, value, best_value)
            best_index = torch.where(better, index + lo, best_index)
        values[start : start + rows] = best_value
        indices[start : start + rows] = best_index
    return values, indices


def _search_table(centroids: torch.Tensor) -> torch.Tensor:
    """[k, dim] centroids -> [dim + 1, k] table whose product with [x, 1] is x.c - ||c||^2 / 2."""
    return torch.cat([centroids.T, centroids.square().sum(-1).mul_(-0.5)[None]], dim=0).contiguous()


def _with_ones(data: torch.Tensor) -> torch.Tensor:
    """[n, dim] -> [n, dim + 1] with a column of ones, the rows that `_search_table` scores."""
    return torch.cat([data, torch.ones_like(data[:, :1])], dim=1)


@torch.no_grad()
def nearest_centroids(
    data: torch.Tensor, centroids: torch.Tensor, *, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> torch.Tensor:
    """Index of the nearest centroid (squared L2) of every row.

    Args:
        data: [num_points, dim] float.
        centroids: [k, dim] float, same dtype as `data`.
        max_chunk_bytes: bound on the [rows, columns] score tile computed at once.

    Returns:
        [num_points] int64 in [0, k); ties go to the lowest index.
    """
    # argmin ||x - c||^2 = argmax (x.c - ||c||^2 / 2)
    return max_inner_product(_with_ones(data), _search_table(centroids), max_chunk_bytes=max_chunk_bytes)[1]


def _initial_centroids(data: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct data points at random; when there are fewer points than k, all points plus jittered copies."""
    num_points = data.shape[0]
    order = torch.randperm(num_points, generator=generator, device="cpu").to(data.device)
    if num_points >= k:
        return data[order[:k]].clone()
    extra = k - num_points
    picks = torch.randint(num_points, (extra,), generator=generator, device="cpu").to(data.device)
    spread = data.std(dim=0, keepdim=True) if num_points > 1 else data.abs() + 1.0
    noise = torch.randn(extra, data.shape[1], generator=generator, device="cpu", dtype=data.dtype).to(data.device)
    return torch.cat([data[order], data[picks] + 0.1 * spread * noise], dim=0)


@torch.no_grad()
def kmeans(
    data: torch.Tensor,
    k: int,
    *,
    generator: torch.Generator,
    max_iters: int = 100,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    tolerance: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means, started from random data points.

    Stops early once no assignment changes, or once an iteration lowers the sum of squared distances
    by less than `tolerance` (relative).

    Args:
        data: [num_points, dim] float32/float64.
        k: number of centroids (may exceed num_points: the extra centroids start as jittered copies).
        generator: CPU generator for the initial centroids (same generator state -> same result).
        max_iters: most Lloyd iterations (0 returns the initial centroids and their assignment).
        max_chunk_bytes: memory knob of the nearest-centroid search (see module docstring).
        tolerance: relative decrease of the squared error below which the iterations stop (0: never).

    Returns:
        centroids [k, dim] (dtype of `data`; a centroid that loses all its points keeps its last value),
        assignment [num_points] int64.
    """
    if data.ndim != 2:
        raise ValueError(f"`data` must be 2-D [num_points, dim], got shape {tuple(data.shape)}")
    if data.shape[0] == 0:
        raise ValueError("`data` has no points")
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"`tolerance` must be in [0, 1), got {tolerance}")
    augmented = _with_ones(data)  # [num_points, dim + 1]
    total_square = float(data.double().square().sum())
    centroids = _initial_centroids(data, k, generator)  # [k, dim]
    best, assignment = max_inner_product(augmented, _search_table(centroids), max_chunk_bytes=max_chunk_bytes)
    error = total_square - 2 * float(best.double().sum())
    for _ in range(max_iters):
        counts = torch.bincount(assignment, minlength=k)  # [k]
        sums = torch.zeros_like(centroids).index_add_(0, assignment, data)  # [k, dim]
        nonempty = counts > 0
        centroids = torch.where(nonempty[:, None], sums / counts.clamp_min(1)[:, None].to(data.dtype), centroids)
        best, new_assignment = max_inner_product(
            augmented, _search_table(centroids), max_chunk_bytes=max_chunk_bytes
        )
        new_error = total_square - 2 * float(best.double().sum())
        if torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        converged = error - new_error <= tolerance * max(error, 0.0)
        error = new_error
        if converged:
            break
    return centroids, assignment


@torch.no_grad()
def residual_kmeans_init(
    groups: torch.Tensor,
    *,
    num_codebooks: int,
    codebook_size: int,
    generator: torch.Generator,
    max_iters: int = 100,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    tolerance: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial additive codebooks: k-means on the groups, then on what the first codebook leaves, and so on.

    Args:
        groups: [num_groups, group_dim] float, the (scaled) weight groups to encode.
        num_codebooks: M, codebooks fitted one after another on the running residual.
        codebook_size: K = 2^B entries per codebook.
        generator: CPU generator shared by the M k-means runs (in order).
        max_iters, max_chunk_bytes, tolerance: passed to `kmeans`.

    Returns:
        codebooks [num_codebooks, codebook_size, group_dim] (dtype of `groups`),
        codes [num_groups, num_codebooks] int64 in [0, codebook_size).
    """
    residual = groups.clone()  # [num_groups, group_dim]
    codebooks, codes = [], []
    for _ in range(num_codebooks):
        centroids, assignment = kmeans(
            residual,
            codebook_size,
            generator=generator,
            max_iters=max_iters,
            max_chunk_bytes=max_chunk_bytes,
            tolerance=tolerance,
        )
        residual -= centroids[assignment]
        codebooks.append(centroids)
        codes.append(assignment)
    return torch.stack(codebooks), torch.stack(codes, dim=-1)
