"""k-means on small vectors, and the residual k-means initialisation of additive codebooks.

Pure functions: tensors in, tensors out, every random draw from an explicit `torch.Generator`.
The memory knob `max_chunk_bytes` bounds the [rows, k] score matrix built per step of the nearest-
centroid search; smaller chunks also keep it in cache, which is what makes the search fast.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_BYTES = 4 * 2**20


def _rows_per_chunk(num_rows: int, k: int, max_chunk_bytes: int) -> int:
    return max(1, min(num_rows, max_chunk_bytes // (4 * k)))


@torch.no_grad()
def nearest_centroids(
    data: torch.Tensor, centroids: torch.Tensor, *, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> torch.Tensor:
    """Index of the nearest centroid (squared L2) of every row.

    Args:
        data: [num_points, dim] float.
        centroids: [k, dim] float, same dtype as `data`.
        max_chunk_bytes: bound on the [rows, k] score block computed at once.

    Returns:
        [num_points] int64 in [0, k); ties go to the lowest index.
    """
    num_points = data.shape[0]
    k = centroids.shape[0]
    # argmin ||x - c||^2 = argmax (x.c - ||c||^2 / 2)
    half_sq_norms = centroids.square().sum(-1).mul_(0.5)  # [k]
    centroids_t = centroids.T.contiguous()  # [dim, k]
    out = torch.empty(num_points, dtype=torch.int64, device=data.device)
    step = _rows_per_chunk(num_points, k, max_chunk_bytes)
    for start in range(0, num_points, step):
        block = data[start : start + step]
        scores = torch.addmm(half_sq_norms, block, centroids_t, beta=-1.0)  # [rows, k]
        out[start : start + step] = scores.argmax(-1)
    return out


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means, started from random data points; stops early once no assignment changes.

    Args:
        data: [num_points, dim] float32/float64.
        k: number of centroids (may exceed num_points: the extra centroids start as jittered copies).
        generator: CPU generator for the initial centroids (same generator state -> same result).
        max_iters: most Lloyd iterations (0 returns the initial centroids and their assignment).
        max_chunk_bytes: memory knob of the nearest-centroid search (see module docstring).

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
    centroids = _initial_centroids(data, k, generator)  # [k, dim]
    assignment = nearest_centroids(data, centroids, max_chunk_bytes=max_chunk_bytes)  # [num_points]
    for _ in range(max_iters):
        counts = torch.bincount(assignment, minlength=k)  # [k]
        sums = torch.zeros_like(centroids).index_add_(0, assignment, data)  # [k, dim]
        nonempty = counts > 0
        centroids = torch.where(nonempty[:, None], sums / counts.clamp_min(1)[:, None].to(data.dtype), centroids)
        new_assignment = nearest_centroids(data, centroids, max_chunk_bytes=max_chunk_bytes)
        if torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial additive codebooks: k-means on the groups, then on what the first codebook leaves, and so on.

    Args:
        groups: [num_groups, group_dim] float, the (scaled) weight groups to encode.
        num_codebooks: M, codebooks fitted one after another on the running residual.
        codebook_size: K = 2^B entries per codebook.
        generator: CPU generator shared by the M k-means runs (in order).
        max_iters, max_chunk_bytes: passed to `kmeans`.

    Returns:
        codebooks [num_codebooks, codebook_size, group_dim] (dtype of `groups`),
        codes [num_groups, num_codebooks] int64 in [0, codebook_size).
    """
    residual = groups.clone()  # [num_groups, group_dim]
    codebooks, codes = [], []
    for _ in range(num_codebooks):
        centroids, assignment = kmeans(
            residual, codebook_size, generator=generator, max_iters=max_iters, max_chunk_bytes=max_chunk_bytes
        )
        residual -= centroids[assignment]
        codebooks.append(centroids)
        codes.append(assignment)
    return torch.stack(codebooks), torch.stack(codes, dim=-1)
