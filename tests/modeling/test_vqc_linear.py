"""VQCGeneratedLinear: parameter budget, informative circuit outputs, eval cache, noise only in training,
merge_to_linear, fitting, and the low-rank algebra behind the fit and the SVD baseline."""

import pytest
import torch
import torch.nn.functional as F

from riverone_hf.modeling import VQCGeneratedLinear, vqc_circuit
from riverone_hf.modeling.low_rank import LowRankObjective, svd_rank_for_budget, truncated_svd
from riverone_hf.metrics.vqc_accounting import account_layer, classical_twin, format_accounts
from riverone_hf.modeling.vqc_circuit import CircuitFeatures
from riverone_hf.aq import relative_output_error

SMALL = {"n_wires": 2, "n_layers": 1, "rank": 3, "hidden_size": 4, "chunk_size": 8}


def small(seed=0, **overrides) -> VQCGeneratedLinear:
    return VQCGeneratedLinear(24, 40, bias=True, seed=seed, **{**SMALL, **overrides})


def inputs(rows=5, features=24, seed=1):
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "shape, expected",
    [((512, 512), 34_232), ((1536, 576), 34_504), ((9728, 2560), 37_048)],
    ids=["512x512", "576x1536", "2560x9728"],
)
def test_default_generator_is_smaller_than_dense(shape, expected):
    out_features, in_features = shape
    module = VQCGeneratedLinear(in_features, out_features, device="meta")
    assert module.num_generator_parameters() == expected
    assert expected < out_features * in_features


def test_small_generator_is_smaller_than_dense():
    module = small()
    assert module.num_generator_parameters() < 24 * 40
    assert all(p is not module.bias for p in module.generator_parameters())


def test_circuit_outputs_differ_per_chunk_and_receive_gradients():
    module = small()
    z = module.features()
    assert z.shape == (module.n_chunks, 2)
    assert (z.std(dim=0) > 0.05).all(), f"measurements barely vary across chunks: {z}"
    module.train()
    module(inputs()).square().sum().backward()
    for name in ("features.contexts", "features.weights"):
        grad = dict(module.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_eval_caches_the_weight_and_training_invalidates_it():
    module = small().eval()
    x = inputs()
    with torch.no_grad():
        first = module(x)
        runs = module.generations
        assert torch.equal(module(x), first)
        assert module.generations == runs, "the circuit ran again in eval mode"
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    module(x).square().sum().backward()
    optimizer.step()
    module.eval()
    with torch.no_grad():
        after = module(x)
    assert module.generations > runs + 1 and not torch.allclose(after, first)


def test_cache_follows_in_place_updates_and_state_dict():
    module = small().eval()
    x = inputs()
    with torch.no_grad():
        before = module(x)
        module.features.contexts.add_(1.0)  # in place, in eval mode: the version counter changes
        changed = module(x)
        assert not torch.allclose(before, changed)
        module.load_state_dict(small(seed=0).state_dict())
        assert torch.allclose(module(x), before)


def test_eval_with_grad_enabled_regenerates_so_gradients_flow():
    module = small().eval()
    module(inputs()).sum().backward()
    assert module.features.contexts.grad is not None


def test_noise_only_in_training():
    noisy = small(noise_probability=0.4)
    clean = small(noise_probability=0.0)
    clean.load_state_dict(noisy.state_dict())
    x = inputs()
    noisy.eval(), clean.eval()
    with torch.no_grad():
        a, b = noisy(x), noisy(x)
        assert torch.equal(a, b)
        assert torch.allclose(a, clean(x))
    noisy.train()
    torch.manual_seed(0)
    draws = [noisy.features() for _ in range(4)]
    assert any(not torch.allclose(draws[0], d) for d in draws[1:]), "noise never fired in training"


def test_sampled_pauli_noise_matches_the_exact_channel():
    torch.manual_seed(0)
    sampled = CircuitFeatures(3000, 2, 2, noise_probability=0.2)
    exact = CircuitFeatures(1, 2, 2, noise_probability=0.2, exact_noise=True)
    with torch.no_grad():
        sampled.contexts.copy_(exact.contexts.expand_as(sampled.contexts))
        sampled.weights.copy_(exact.weights)
    mean = sampled.train()().mean(0)
    channel = exact.train()()[0]
    noiseless = exact.eval()()[0]
    assert torch.allclose(mean, channel, atol=0.06), (mean, channel)
    assert not torch.allclose(channel, noiseless, atol=0.05)


def test_exact_noise_refuses_too_many_wires():
    with pytest.raises(ValueError, match="exact_noise"):
        CircuitFeatures(2, 9, 1, noise_probability=0.1, exact_noise=True)


@pytest.mark.parametrize("low_rank", [False, True], ids=["linear", "low-rank-pair"])
def test_merge_to_linear_gives_the_same_outputs(low_rank):
    module = small().eval()
    merged = module.merge_to_linear(low_rank=low_rank)
    assert not any(isinstance(m, VQCGeneratedLinear) for m in merged.modules())
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), module(x), rtol=1e-5, atol=1e-6)


def test_dense_path_when_low_rank_is_not_cheaper():
    module = VQCGeneratedLinear(6, 6, n_wires=2, n_layers=1, rank=6, hidden_size=4, chunk_size=4, seed=0).eval()
    assert not module.low_rank_is_cheaper
    x = inputs(features=6)
    with torch.no_grad():
        torch.testing.assert_close(module(x), F.linear(x, module.weight_matrix(), module.bias))


def test_rank_larger_than_the_layer_raises():
    with pytest.raises(ValueError, match="rank"):
        VQCGeneratedLinear(4, 40, rank=5, n_wires=2)


def test_missing_pennylane_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(vqc_circuit, "is_pennylane_available", lambda: False)
    with pytest.raises(ImportError, match="pip install"):
        small()


@pytest.mark.parametrize("calibrated", [False, True], ids=["weight", "xtx"])
def test_fit_improves_on_the_random_start(calibrated):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 6, generator=gen) @ torch.randn(6, 24, generator=gen) * 0.05
    x = torch.randn(200, 24, generator=gen) * torch.linspace(0.1, 2, 24)
    xtx = x.T @ x / len(x) if calibrated else None
    module = small()
    result = module.fit_(weight, xtx, steps=5, lr=1e-3, progress=False)
    assert result.final_error < result.initial_error
    assert result.final_error <= result.warm_start_error + 1e-9
    assert abs(result.final_error - relative_output_error(weight, module.weight_matrix(), xtx)) < 1e-6


def test_objective_and_truncated_svd():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(30, 20, generator=gen)
    x = torch.randn(100, 20, generator=gen) * torch.linspace(0.1, 3, 20)
    xtx = x.T @ x / len(x)
    u, v = truncated_svd(weight, 5)
    assert abs(float(LowRankObjective(weight)(u, v)) - relative_output_error(weight, u @ v.T)) < 1e-4
    plain = relative_output_error(weight, u @ v.T, xtx)
    uw, vw = truncated_svd(weight, 5, xtx)
    assert relative_output_error(weight, uw @ vw.T, xtx) < plain  # output-aware SVD wins on its objective
    assert svd_rank_for_budget(1000, 30, 20) == 20 and svd_rank_for_budget(499, 30, 20) == 9


def test_accounting_row_and_classical_ablation():
    weight = torch.randn(40, 24, generator=torch.Generator().manual_seed(5))
    module = small()
    module.fit_(weight, steps=2, progress=False)
    twin = classical_twin(module, seed=0)
    twin.fit_(weight, steps=2, progress=False)
    account = account_layer("layer", module, weight, classical=twin)
    assert account.svd_params <= account.vqc_params and account.dense_params == 960
    assert twin.num_generator_parameters() <= module.num_generator_parameters()
    assert 0 <= account.svd_error <= 1 and account.classical_error is not None
    assert "| layer | 40x24 | 960 |" in format_accounts([account])
