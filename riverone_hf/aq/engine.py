"""AQLM engine: quantize one weight matrix into additive codes, codebooks and per-output-group scales.

Objective: the output error trace((W - Ŵ) xtx (W - Ŵ)ᵀ) with xtx = XᵀX / n from calibration inputs,
or the weight error ||W - Ŵ||² when xtx is None (data-free). The algorithm:

1. scales: one per output group, the norm of its rows; the scaled weight groups are
   initialised by residual k-means (`kmeans.residual_kmeans_init`, at most `kmeans_iters` iterations,
   stopping once an iteration gains less than `KMEANS_TOLERANCE`);
2. up to `max_epochs` rounds of: a codebook update with the codes fixed, then a beam search over the
   codes with codebooks and scales fixed (`beam_search.beam_search_codes`). The codebook update is
   `codebook_optimizer="cg"` (default): for fixed codes Ŵ is linear in the codebooks and, per output
   group, in its scale, so the scales are solved in closed form and the codebooks by preconditioned
   conjugate gradient (`steps_per_epoch` iterations, one [out, in] x [in, in] product each); or `"adam"`:
   `steps_per_epoch` Adam steps with `codebook_lr`, as the reference AQLM code does. For fixed codes, 5 CG
   iterations lower the error further than 100 Adam steps on the test problem of
   `tests/aq/test_engine.py::test_cg_codebook_update_beats_adam_and_solves_scales`. Both updates apply
   Ŵ = s ⊙ A(C) through `layout.CodeOperator`, the map `layout.dequantize` uses;
3. stop once a round improves the objective by less than `relative_tolerance` (relative).

The result is in the `aqlm` layout (`layout.QuantizedWeight`): float32 codebooks and scales, signed codes.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from .beam_search import DEFAULT_CHUNK_BYTES as BEAM_CHUNK_BYTES
from .beam_search import beam_search_codes
from .kmeans import DEFAULT_CHUNK_BYTES as KMEANS_CHUNK_BYTES
from .kmeans import residual_kmeans_init
from .layout import CodeOperator, QuantizedWeight, dequantize, diagonal_blocks, pack_codes
from .settings import AqSettings, CodebookOptimizer

logger = logging.getLogger(__name__)

CG_ITERATIONS_PER_SCALE_SOLVE = 5  # "cg" update: conjugate-gradient iterations between closed-form scale solves
KMEANS_TOLERANCE = 1e-3  # stop k-means once an iteration lowers its squared error by less than this (relative)
ADAM_BETAS = (0.0, 0.95)  # no first-moment averaging: the codes change under the codebooks every round
ADAM_AMSGRAD = True


def _output_error_terms(delta: torch.Tensor, xtx: torch.Tensor | None) -> torch.Tensor:
    """trace(Δ xtx Δᵀ) (or ||Δ||² without xtx), computed in float64."""
    delta = delta.detach().double()
    if xtx is None:
        return delta.square().sum()
    return (delta @ xtx.double()).mul_(delta).sum()


@torch.no_grad()
def relative_output_error(weight: torch.Tensor, dequantized: torch.Tensor, xtx: torch.Tensor | None = None) -> float:
    """trace((W - Ŵ) xtx (W - Ŵ)ᵀ) / trace(W xtx Wᵀ) in float64; with xtx None, ||W - Ŵ||² / ||W||².

    Args:
        weight: [out_features, in_features] reference weight W.
        dequantized: [out_features, in_features] reconstruction Ŵ.
        xtx: [in_features, in_features] XᵀX / n, or None.
    """
    if weight.shape != dequantized.shape:
        raise ValueError(f"`weight` {tuple(weight.shape)} and `dequantized` {tuple(dequantized.shape)} differ in shape")
    weight = weight.detach().double()
    numerator = _output_error_terms(weight - dequantized.detach().double(), xtx)
    denominator = _output_error_terms(weight, xtx)
    return float(numerator / denominator) if denominator > 0 else float(numerator)


def _validate(weight: torch.Tensor, xtx: torch.Tensor | None, settings: AqSettings, seed: int) -> None:
    """Raise ValueError for inputs `quantize_weight` cannot work on, before any work is done.

    Checks: weight [out, in] floating, non-empty, finite, divisible by the group sizes; xtx [in, in],
    finite, on weight's device and symmetric; seed a non-negative int.
    """
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"`weight` must be a 2-D tensor [out_features, in_features], got {shape}")
    if not weight.is_floating_point():
        raise ValueError(f"`weight` must be a floating-point tensor, got dtype {weight.dtype}")
    out_features, in_features = weight.shape
    if out_features == 0 or in_features == 0:
        raise ValueError(f"`weight` is empty, shape {tuple(weight.shape)}")
    if out_features % settings.out_group_size or in_features % settings.in_group_size:
        raise ValueError(
            f"`weight` shape out={out_features}, in={in_features} is not divisible by "
            f"out_group_size={settings.out_group_size} / in_group_size={settings.in_group_size}"
        )
    if not torch.isfinite(weight).all():
        raise ValueError("`weight` holds NaN or infinite values")
    if xtx is not None:
        if not isinstance(xtx, torch.Tensor) or xtx.shape != (in_features, in_features):
            shape = tuple(xtx.shape) if isinstance(xtx, torch.Tensor) else type(xtx).__name__
            raise ValueError(f"`xtx` must be [in_features, in_features] = [{in_features}, {in_features}], got {shape}")
        if not xtx.is_floating_point() or not torch.isfinite(xtx).all():
            raise ValueError("`xtx` must be a finite floating-point tensor")
        if xtx.device != weight.device:
            raise ValueError(f"`xtx` is on {xtx.device} but `weight` is on {weight.device}")
        scale = xtx.abs().max().clamp_min(torch.finfo(xtx.dtype).tiny)
        if ((xtx - xtx.T).abs().max() / scale) > 1e-4:
            raise ValueError("`xtx` must be symmetric (XᵀX / n)")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"`seed` must be an integer >= 0, got {seed!r}")


class _Objective:
    """The relative output error of a reconstruction, float64, with the denominator computed once."""

    def __init__(self, weight: torch.Tensor, xtx64: torch.Tensor | None):
        """weight: [out, in]; xtx64: [in, in] float64, or None for the weight error."""
        self.weight64 = weight.double()
        self.xtx64 = xtx64
        total = float(_output_error_terms(self.weight64, xtx64))
        self.denominator = total if total > 0 else 1.0

    def __call__(self, dequantized: torch.Tensor) -> float:
        """[out, in] reconstruction Ŵ -> its relative output error (float64, returned as a float)."""
        return float(_output_error_terms(self.weight64 - dequantized.double(), self.xtx64)) / self.denominator


def _adam_steps(
    weight: torch.Tensor,
    xtx: torch.Tensor | None,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    steps: int,
    denominator: float,
) -> float | None:
    """`steps` Adam steps on `codebooks` and `scales` (leaf tensors) for the relative output error.

    The codes are fixed here, so Ŵ = s ⊙ A(C) is the `CodeOperator` of the codes and the gradient is
    written out with it instead of going through autograd: with G = 2 (Ŵ - W) xtx / denominator (one
    [out, in] x [in, in] product per step), dL/dC = Aᵀ(s ⊙ G) and dL/ds_o = Σ_i <G_oi, A(C)_oi>.

    Args:
        weight: [out, in] float32; xtx: [in, in] float32 or None (identity);
        codes: [O, I, M] int64; codebooks: [M, K, go, gi] and scales: [O, 1, 1, 1] float32 leaves.
        optimizer: steps `codebooks` and `scales` from the `.grad` written here.
        steps: Adam steps; denominator: normalisation of the loss.

    Returns:
        the loss before the last step (None when steps == 0); raises FloatingPointError if it is non-finite.
    """
    num_codebooks, codebook_size, out_group_size, in_group_size = codebooks.shape
    operator = CodeOperator(codes, codebook_size, out_group_size, in_group_size)
    loss_value = None
    for step in range(steps):
        with torch.no_grad():
            group_scales = scales.detach().view(-1)  # [O]
            unscaled = operator.codewords(codebooks.detach().view(num_codebooks * codebook_size, -1))  # [O, I, go*gi]
            delta = operator.to_weight(unscaled, group_scales) - weight  # Ŵ - W, [out, in]
            grad = delta if xtx is None else delta @ xtx  # [out, in]
            loss = (grad * delta).sum(dtype=torch.float64) / denominator
            loss_value = float(loss)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"AQLM codebook update: the loss is {loss_value} at step {step}")
            grad = grad.mul(2.0 / denominator)
            scales.grad = (operator.to_groups(grad) * unscaled).sum((1, 2)).view_as(scales)
            codebooks.grad = operator.adjoint(grad, group_scales).view_as(codebooks)
        optimizer.step()
    return loss_value


def _block_preconditioner(
    operator: CodeOperator, scales: torch.Tensor, diag_blocks: torch.Tensor | None
) -> torch.Tensor:
    """Inverse of the block diagonal of AᵀsHsA per codeword: [M*K, gi, gi] (the same for its go rows).

    Block of codeword k: Σ over the (o, i) that use it of s_o² H_ii (identity blocks when H is None), with a
    small ridge so that it is invertible; a codeword no group uses gets the identity.

    Args:
        operator: the `CodeOperator` of the current codes; scales: [O];
        diag_blocks: [I, gi, gi] from `layout.diagonal_blocks`, or None (H = identity).
    """
    in_group_size, num_in_groups = operator.in_group_size, operator.num_in_groups
    weights = scales.square().repeat_interleave(num_in_groups)  # [O*I]
    if diag_blocks is None:
        contributions = weights[:, None]  # [O*I, 1]: multiples of the identity
    else:
        contributions = (weights.view(operator.num_out_groups, num_in_groups, 1) * diag_blocks.reshape(
            1, num_in_groups, -1)).reshape(-1, in_group_size * in_group_size)  # [O*I, gi*gi]
    blocks = operator.sum_per_codeword(contributions)  # [M*K, 1 or gi*gi]
    eye = torch.eye(in_group_size, dtype=scales.dtype, device=scales.device)
    if diag_blocks is None:
        blocks = blocks[:, :, None] * eye
    blocks = blocks.view(-1, in_group_size, in_group_size)
    size = blocks.diagonal(dim1=-2, dim2=-1).mean(-1)  # [M*K]
    unused = size <= 0  # a codeword no group uses: no curvature, and no gradient either
    ridge = torch.where(unused, torch.ones_like(size), 1e-6 * size)
    return torch.linalg.inv(blocks + ridge[:, None, None] * eye)


def _codebook_update_cg(
    weight: torch.Tensor,
    weight_h: torch.Tensor,
    xtx: torch.Tensor | None,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    iterations: int,
    denominator: float,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Minimise the output error over codebooks and scales for fixed codes (the "cg" codebook update).

    For fixed codes Ŵ = s ⊙ A(C) is linear in the codebooks C and, per output group, in its scale s_o, so:
    every `CG_ITERATIONS_PER_SCALE_SOLVE` iterations the scales are solved in closed form
    (s_o = <W_o, U_o H> / <U_o, U_o H> with U = A(C)), then conjugate gradient, preconditioned with the
    per-codeword blocks of the Hessian (Σ s_o² H_ii over the groups using a codeword), runs on the
    quadratic in C. Each iteration costs one [out, in] x [in, in] product (none without xtx).

    Args:
        weight: [out, in] float32; weight_h: weight @ xtx (weight itself when xtx is None);
        xtx: [in, in] float32 or None (identity); codes: [O, I, M] int64;
        codebooks: [M, K, go, gi] and scales: [O, 1, 1, 1] float32 (not modified).
        iterations: conjugate-gradient iterations (0 still solves the scales once).
        denominator: normalisation of the reported loss.

    Returns:
        new codebooks, new scales (same shapes) and the relative loss after the first scale solve;
        raises FloatingPointError when that loss is non-finite.
    """
    num_out_groups = codes.shape[0]
    num_codebooks, codebook_size, out_group_size, in_group_size = codebooks.shape
    operator = CodeOperator(codes, codebook_size, out_group_size, in_group_size)
    flat = codebooks.detach().reshape(num_codebooks * codebook_size, -1).clone()  # [M*K, go*gi]
    group_scales = scales.detach().reshape(num_out_groups).clone()  # [O]
    diag_blocks = None if xtx is None else diagonal_blocks(xtx, in_group_size)  # [I, gi, gi]

    def times_h(matrix: torch.Tensor) -> torch.Tensor:
        """[out, in] -> matrix · xtx (the matrix itself when xtx is None)."""
        return matrix if xtx is None else matrix @ xtx

    def per_group(matrix: torch.Tensor) -> torch.Tensor:
        """[out, in] -> [O] float64 sum over each output group's rows."""
        return matrix.reshape(num_out_groups, -1).sum(-1, dtype=torch.float64)

    loss_value = None
    done = 0
    while done < iterations or loss_value is None:
        unscaled = operator.apply(flat, None)  # [out, in]
        unscaled_h = times_h(unscaled)
        numerator, curvature = per_group(unscaled_h * weight), per_group(unscaled_h * unscaled)
        solved = (numerator / curvature.clamp_min(torch.finfo(torch.float64).tiny)).to(group_scales.dtype)
        group_scales = torch.where(curvature > 0, solved, group_scales)
        row_scales = group_scales.repeat_interleave(out_group_size)[:, None]  # [out, 1]
        residual_h = weight_h - unscaled_h * row_scales  # (W - Ŵ) H
        if loss_value is None:
            loss = (residual_h * (weight - unscaled * row_scales)).sum(dtype=torch.float64) / denominator
            loss_value = float(loss)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"AQLM codebook update: the loss is {loss_value}")
        steps = min(CG_ITERATIONS_PER_SCALE_SOLVE, iterations - done)
        if steps <= 0:
            break
        inverse_blocks = _block_preconditioner(operator, group_scales, diag_blocks)  # [M*K, gi, gi]

        def precondition(vector: torch.Tensor) -> torch.Tensor:
            """[M*K, go*gi] -> the same with each codeword's gi-blocks times its inverse Hessian block."""
            return (vector.view(-1, out_group_size, in_group_size) @ inverse_blocks).view_as(vector)

        gradient = operator.adjoint(residual_h, group_scales)  # minus the gradient of ½ loss, [M*K, go*gi]
        direction = precondition(gradient)
        dot = (gradient * direction).sum(dtype=torch.float64)
        for _ in range(steps):
            if dot <= 0:
                break
            curved = operator.adjoint(times_h(operator.apply(direction, group_scales)), group_scales)
            step = dot / (direction * curved).sum(dtype=torch.float64)
            if not torch.isfinite(step):
                break
            flat.add_(direction, alpha=float(step))
            gradient.sub_(curved, alpha=float(step))
            preconditioned = precondition(gradient)
            new_dot = (gradient * preconditioned).sum(dtype=torch.float64)
            direction = preconditioned.add_(direction, alpha=float(new_dot / dot))
            dot = new_dot
        done += steps
    return (
        flat.view(num_codebooks, codebook_size, out_group_size, in_group_size),
        group_scales.view(num_out_groups, 1, 1, 1),
        loss_value,
    )


def quantize_weight(
    weight: torch.Tensor,
    xtx: torch.Tensor | None = None,
    settings: AqSettings | None = None,
    seed: int | None = None,
    *,
    max_chunk_bytes: int | None = None,
) -> QuantizedWeight:
    """Additive quantization (AQLM) of one weight matrix.

    Args:
        weight: [out_features, in_features] float tensor (cast to float32 for the work).
        xtx: [in_features, in_features] XᵀX / n of the layer's calibration inputs (float64 recommended),
            or None for the data-free weight objective.
        settings: `AqSettings` (scheme, beam size, rounds, codebook update, tolerance, k-means iterations, seed),
            e.g. the AQLM stage's `AqlmSpec`; defaults to `AqSettings()`.
        seed: overrides `settings.seed`; the same seed gives bit-identical codes on the same machine/threads.
        max_chunk_bytes: memory knob for the k-means and beam-search working sets (per chunk of
            output groups); None uses the modules' defaults.

    Returns:
        `QuantizedWeight` with codes [out/og, in/ig, M] (signed int8/int16), codebooks [M, 2^B, og, ig]
        float32 and scales [out/og, 1, 1, 1] float32, on `weight`'s device.

    Raises:
        ValueError: bad shapes, non-finite inputs, a non-symmetric xtx, or a bad seed.
        FloatingPointError: the objective became non-finite during the codebook update.
    """
    if settings is None:
        settings = AqSettings()
    seed = settings.seed if seed is None else seed
    _validate(weight, xtx, settings, seed)

    started = time.perf_counter()
    out_features, in_features = weight.shape
    num_codebooks, nbits = settings.num_codebooks, settings.nbits_per_codebook
    out_group_size, in_group_size = settings.out_group_size, settings.in_group_size
    codebook_size = 2**nbits
    num_out_groups, num_in_groups = out_features // out_group_size, in_features // in_group_size
    generator = torch.Generator().manual_seed(seed)
    kmeans_bytes = max_chunk_bytes or KMEANS_CHUNK_BYTES
    beam_bytes = max_chunk_bytes or BEAM_CHUNK_BYTES

    with torch.no_grad():
        weight = weight.detach().float()  # [out, in]
        xtx64 = None if xtx is None else ((xtx.detach().double() + xtx.detach().double().T) / 2)
        xtx32 = None if xtx64 is None else xtx64.float()
        objective = _Objective(weight, xtx64)

        groups = weight.reshape(num_out_groups, out_group_size, num_in_groups, in_group_size)
        norms = groups.double().square().sum((1, 2, 3)).sqrt().float()  # [num_out_groups], no float32 overflow
        scales = torch.where(norms > 0, norms, torch.ones_like(norms))  # an all-zero group keeps scale 1
        scaled = (groups / scales[:, None, None, None]).permute(0, 2, 1, 3)
        scaled = scaled.reshape(num_out_groups * num_in_groups, out_group_size * in_group_size)
        codebooks, codes = residual_kmeans_init(
            scaled,
            num_codebooks=num_codebooks,
            codebook_size=codebook_size,
            generator=generator,
            max_iters=settings.kmeans_iters,
            max_chunk_bytes=kmeans_bytes,
            tolerance=KMEANS_TOLERANCE,
        )
        codebooks = codebooks.reshape(num_codebooks, codebook_size, out_group_size, in_group_size).contiguous()
        codes = codes.reshape(num_out_groups, num_in_groups, num_codebooks)  # int64 in [0, K)
        scales = scales.reshape(num_out_groups, 1, 1, 1).clone()
        error = objective(dequantize(codes, codebooks, scales))
    if not torch.isfinite(torch.tensor(error)):
        raise FloatingPointError(f"AQLM k-means initialisation gave a non-finite objective ({error})")
    logger.info(
        "AQLM %dx%d g%dx%d on %dx%d: k-means init rel. error %.5f (%.1f s)",
        num_codebooks,
        nbits,
        out_group_size,
        in_group_size,
        out_features,
        in_features,
        error,
        time.perf_counter() - started,
    )

    best = (error, codes, codebooks.clone(), scales.clone())
    use_adam = settings.codebook_optimizer == CodebookOptimizer.ADAM
    if use_adam:
        codebooks.requires_grad_(True)
        scales.requires_grad_(True)
        optimizer = torch.optim.Adam(
            [codebooks, scales], lr=settings.codebook_lr, betas=ADAM_BETAS, amsgrad=ADAM_AMSGRAD
        )
    else:
        with torch.no_grad():
            weight_h = weight if xtx32 is None else weight @ xtx32  # [out, in], fixed for the whole run
    epochs_run = 0
    progress = tqdm(range(settings.max_epochs), desc="AQLM rounds", leave=False)
    for epoch in progress:
        round_started = time.perf_counter()
        if use_adam:
            _adam_steps(
                weight, xtx32, codes, codebooks, scales, optimizer, settings.steps_per_epoch, objective.denominator
            )
        else:
            with torch.no_grad():
                codebooks, scales, _ = _codebook_update_cg(
                    weight, weight_h, xtx32, codes, codebooks, scales, settings.steps_per_epoch, objective.denominator
                )
        update_seconds = time.perf_counter() - round_started
        with torch.no_grad():
            codes = beam_search_codes(
                weight,
                codes,
                codebooks,
                scales,
                xtx32,
                beam_size=settings.beam_size,
                generator=generator,
                max_chunk_bytes=beam_bytes,
            )
            new_error = objective(dequantize(codes, codebooks, scales))
        if not torch.isfinite(torch.tensor(new_error)):
            raise FloatingPointError(f"AQLM round {epoch + 1}: the objective is {new_error}")
        epochs_run = epoch + 1
        logger.info(
            "AQLM round %d: rel. error %.5f (codebook update %.1f s, beam search %.1f s)",
            epochs_run,
            new_error,
            update_seconds,
            time.perf_counter() - round_started - update_seconds,
        )
        progress.set_postfix(error=f"{new_error:.5f}")
        gain = (error - new_error) / error if error > 0 else 0.0
        if new_error < best[0]:
            best = (new_error, codes, codebooks.detach().clone(), scales.detach().clone())
        error = new_error
        if gain < settings.relative_tolerance:
            break
    progress.close()

    final_error, codes, codebooks, scales = best
    logger.info(
        "AQLM done: rel. error %.5f after %d round(s), %.1f s", final_error, epochs_run, time.perf_counter() - started
    )
    return QuantizedWeight(
        codes=pack_codes(codes, nbits),
        codebooks=codebooks.detach().float().contiguous(),
        scales=scales.detach().float().contiguous(),
    )
