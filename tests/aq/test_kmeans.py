"""k-means and residual k-means initialisation of the AQ engine (small problems, CPU)."""

import pytest
import torch

from riverone_hf.aq.kmeans import (
    MAX_TILE_COLUMNS,
    kmeans,
    max_inner_product,
    nearest_centroids,
    residual_kmeans_init,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blobs(num_clusters=8, per_cluster=50, dim=4, seed=0):
    g = _gen(seed)
    centers = 10 * torch.randn(num_clusters, dim, generator=g)
    labels = torch.arange(num_clusters).repeat_interleave(per_cluster)
    points = centers[labels] + 0.1 * torch.randn(len(labels), dim, generator=g)
    return points, labels


def test_nearest_centroids_matches_brute_force_and_chunking():
    g = _gen(1)
    data, centroids = torch.randn(300, 8, generator=g), torch.randn(37, 8, generator=g)
    expected = torch.cdist(data, centroids).argmin(-1)
    assert torch.equal(nearest_centroids(data, centroids), expected)
    assert torch.equal(nearest_centroids(data, centroids, max_chunk_bytes=1), expected)  # one row per chunk


@pytest.mark.parametrize(
    "max_chunk_bytes", [1, 4096, 2**30], ids=["1-byte-one-row-tiles", "4KiB-tiles", "1GiB-one-tile"]
)
def test_max_inner_product_matches_full_product_across_column_tiles(max_chunk_bytes):
    g = _gen(11)
    queries = torch.randn(40, 9, generator=g)
    table = torch.randn(9, MAX_TILE_COLUMNS + 905, generator=g)  # two column tiles, the second partial
    table[:, 7] = table[:, MAX_TILE_COLUMNS + 3] = 50.0  # an exact tie across tiles: the lower column wins
    queries[0] = 1.0
    values, indices = max_inner_product(queries, table, max_chunk_bytes=max_chunk_bytes)
    expected_values, expected_indices = (queries @ table).max(-1)
    assert torch.equal(indices, expected_indices) and int(indices[0]) == 7
    torch.testing.assert_close(values, expected_values)


def test_kmeans_tolerance_stops_early():
    data = torch.randn(2000, 8, generator=_gen(12))
    # a tolerance of 0.99 stops after the first iteration that gains less than 99%: the first one
    stopped = kmeans(data, 16, generator=_gen(1), max_iters=50, tolerance=0.99)
    one = kmeans(data, 16, generator=_gen(1), max_iters=1)
    full = kmeans(data, 16, generator=_gen(1), max_iters=50)
    assert torch.equal(stopped[0], one[0]) and torch.equal(stopped[1], one[1])
    error = {name: float((data - c[a]).square().sum()) for name, (c, a) in {"one": one, "full": full}.items()}
    assert error["full"] < error["one"]
    with pytest.raises(ValueError, match="tolerance"):
        kmeans(data, 16, generator=_gen(1), tolerance=1.0)


def test_kmeans_recovers_separated_clusters():
    points, labels = _blobs()
    centroids, assignment = kmeans(points, 8, generator=_gen(0), max_iters=50)
    assert centroids.shape == (8, 4) and assignment.shape == (400,) and assignment.dtype == torch.int64
    # every true cluster maps to one found cluster and vice versa (a random start may need a few tries)
    best = min(
        (kmeans(points, 8, generator=_gen(s), max_iters=50) for s in range(5)),
        key=lambda r: (points - r[0][r[1]]).square().sum(),
    )
    pairs = {(int(t), int(f)) for t, f in zip(labels, best[1], strict=True)}
    assert len(pairs) == 8


def test_kmeans_never_increases_error_over_iterations():
    data = torch.randn(500, 8, generator=_gen(2))
    errors = []
    for iters in (0, 1, 5, 20):
        c, a = kmeans(data, 16, generator=_gen(3), max_iters=iters)
        errors.append(float((data - c[a]).square().sum()))
    assert all(later <= earlier + 1e-4 for earlier, later in zip(errors[:-1], errors[1:], strict=True))
    assert errors[-1] < errors[0]


def test_kmeans_deterministic_and_seed_dependent():
    data = torch.randn(400, 8, generator=_gen(4))
    c1, a1 = kmeans(data, 32, generator=_gen(7), max_iters=10)
    c2, a2 = kmeans(data, 32, generator=_gen(7), max_iters=10)
    c3, a3 = kmeans(data, 32, generator=_gen(8), max_iters=10)
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    assert not torch.equal(c1, c3)


def test_kmeans_more_centroids_than_points():
    data = torch.randn(20, 8, generator=_gen(5))
    centroids, assignment = kmeans(data, 64, generator=_gen(0), max_iters=5)
    assert centroids.shape == (64, 8)
    assert torch.unique(centroids, dim=0).shape[0] == 64  # the extra centroids are jittered, not duplicates
    torch.testing.assert_close(centroids[assignment], data)  # every point gets its own centroid


def test_kmeans_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        kmeans(torch.randn(10), 2, generator=_gen(0))
    with pytest.raises(ValueError, match="no points"):
        kmeans(torch.randn(0, 3), 2, generator=_gen(0))
    with pytest.raises(ValueError, match="`k`"):
        kmeans(torch.randn(10, 3), 0, generator=_gen(0))


def test_residual_kmeans_init_shapes_and_residual_shrinks():
    groups = torch.randn(1024, 8, generator=_gen(6))
    errors = []
    for num_codebooks in (1, 2, 3):
        codebooks, codes = residual_kmeans_init(
            groups, num_codebooks=num_codebooks, codebook_size=16, generator=_gen(0), max_iters=20
        )
        assert codebooks.shape == (num_codebooks, 16, 8)
        assert codes.shape == (1024, num_codebooks) and codes.dtype == torch.int64
        assert int(codes.min()) >= 0 and int(codes.max()) < 16
        recon = sum(codebooks[m][codes[:, m]] for m in range(num_codebooks))
        errors.append(float((groups - recon).square().sum()))
    assert errors[0] > errors[1] > errors[2]
