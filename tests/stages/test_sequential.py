"""riverone_hf.stages.sequential on tiny Qwen3 / InternVL: block discovery, `quantize(name, xtx)` called
block by block with XᵀX / n of each Linear's actual inputs (checked against forward hooks on a separate
dense model), later blocks fed by the already-replaced earlier ones, and Linears outside the blocks
calibrated by one pass of the original model."""

import logging

import pytest
import torch
from torch import nn

from riverone_hf.stages.sequential import balanced_owners, find_blocks, quantize_sequentially
from tests.tiny_models import input_ids, tiny_internvl, tiny_qwen3

WINDOWS = input_ids(length=12)  # [2, 12]: two calibration windows


def reference_xtx(model: nn.Module, name: str, windows: torch.Tensor = WINDOWS) -> torch.Tensor:
    """XᵀX / n of the rows entering `model.<name>` when each window runs through the whole model."""
    rows = []

    def hook(_module, args):
        rows.append(args[0].detach().reshape(-1, args[0].shape[-1]))

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for window in windows:
                model(input_ids=window[None], use_cache=False)
    finally:
        handle.remove()
    x = torch.cat(rows).double()
    assert len(x) == windows.numel()  # every token of every window reached it once
    return x.T @ x / len(x)


def zero_linear(like: nn.Linear) -> nn.Linear:
    """A Linear of the same shape whose output is all zeros."""
    weight = like.weight
    zero = nn.Linear(like.in_features, like.out_features, bias=False, device=weight.device, dtype=weight.dtype)
    nn.init.zeros_(zero.weight)
    return zero


class Recorder:
    """A `quantize` callback: records (name, xtx) and replaces the names in `zero` by zero_linear."""

    def __init__(self, model: nn.Module, zero: tuple[str, ...] = ()):
        self.model, self.zero, self.calls = model, set(zero), []

    def __call__(self, name: str, xtx: torch.Tensor | None) -> None:
        self.calls.append((name, xtx))
        if name in self.zero:
            self.model.set_submodule(name, zero_linear(self.model.get_submodule(name)))

    @property
    def xtx(self) -> dict[str, torch.Tensor | None]:
        return dict(self.calls)


def run(model, names, zero=()) -> Recorder:
    recorder = Recorder(model, zero)
    quantize_sequentially(model, names, WINDOWS, recorder, "TEST")
    return recorder


def assert_xtx_close(actual, expected):
    assert actual is not None and actual.dtype == torch.float64 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "builder, prefix, blocks_of",
    [
        (tiny_qwen3, "model.layers", lambda m: m.model.layers),
        (tiny_internvl, "model.language_model.layers", lambda m: m.model.language_model.layers),
    ],
    ids=["qwen3", "internvl-language-model"],
)
def test_find_blocks(builder, prefix, blocks_of):
    model = builder()
    name, blocks = find_blocks(model)
    assert name == prefix
    assert isinstance(blocks, nn.ModuleList) and blocks is blocks_of(model) and len(blocks) == 2


def test_calls_in_block_order_then_outside_with_the_actual_xtx():
    names = ["lm_head", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj"]
    recorder = run(tiny_qwen3(), names)
    called = [name for name, _ in recorder.calls]
    assert sorted(called) == sorted(names)  # each once
    block = {"model.layers.0": 0, "model.layers.1": 1}
    assert [block.get(n.rsplit(".", 2)[0], 2) for n in called] == [0, 0, 1, 2]  # blocks in order, lm_head last
    dense = tiny_qwen3()  # the same weights, never touched by quantize_sequentially
    for name in names:  # nothing replaced: every Linear sees exactly the dense model's inputs
        assert_xtx_close(recorder.xtx[name], reference_xtx(dense, name))


def test_later_blocks_see_the_replaced_earlier_blocks():
    first, later = "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"
    recorder = run(tiny_qwen3(), [first, later, "lm_head"], zero=(first, later))
    dense = tiny_qwen3()
    assert_xtx_close(recorder.xtx[first], reference_xtx(dense, first))  # collected before its replacement
    expected = tiny_qwen3()
    expected.set_submodule(first, zero_linear(expected.get_submodule(first)))
    assert_xtx_close(recorder.xtx[later], reference_xtx(expected, later))
    assert not torch.allclose(recorder.xtx[later], reference_xtx(dense, later), rtol=1e-3)  # the zeros mattered
    # outside the blocks: one pass of the original model, before any block was replaced
    assert_xtx_close(recorder.xtx["lm_head"], reference_xtx(dense, "lm_head"))


def test_only_outside_linears_need_no_block_pass():
    model = tiny_qwen3()
    block_runs = []
    for block in model.model.layers:
        block.register_forward_pre_hook(lambda *_: block_runs.append(1))
    recorder = run(model, ["lm_head"])
    assert [name for name, _ in recorder.calls] == ["lm_head"]
    assert len(block_runs) == len(WINDOWS) * 2  # the calibration pass through the model, nothing after
    assert_xtx_close(recorder.xtx["lm_head"], reference_xtx(tiny_qwen3(), "lm_head"))


def test_internvl_text_calibrates_the_language_model_and_gives_the_vision_tower_none(caplog):
    language, vision = "model.language_model.layers.0.mlp.gate_proj", "model.vision_tower.encoder.layer.0.mlp.fc1"
    with caplog.at_level(logging.WARNING, logger="riverone_hf.stages.sequential"):
        recorder = run(tiny_internvl(), [vision, language])
    assert [name for name, _ in recorder.calls] == [language, vision]
    assert_xtx_close(recorder.xtx[language], reference_xtx(tiny_internvl(), language))
    assert recorder.xtx[vision] is None  # no text reaches the vision tower
    assert any(vision in record.getMessage() and "TEST" in record.getMessage() for record in caplog.records)


@pytest.mark.gpu
def test_on_cuda_the_xtx_are_on_the_device_and_match_the_cpu_run():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    on_cpu = run(tiny_qwen3(), names, zero=("model.layers.0.self_attn.q_proj",))
    on_gpu = run(tiny_qwen3().cuda(), names, zero=("model.layers.0.self_attn.q_proj",))  # windows stay on the CPU
    assert [name for name, _ in on_gpu.calls] == [name for name, _ in on_cpu.calls]
    for name in names:
        assert on_gpu.xtx[name].is_cuda
        torch.testing.assert_close(on_gpu.xtx[name].cpu(), on_cpu.xtx[name], rtol=1e-4, atol=1e-6)


def test_balanced_owners_deal_matrices_by_size():
    # a Qwen3-style block under GQA: q, k, v, o, gate, up, down (weights each)
    sizes = [576 * 576, 192 * 576, 192 * 576, 576 * 576, 1536 * 576, 1536 * 576, 576 * 1536]
    owners = balanced_owners(sizes, 2)
    loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert max(loads) - min(loads) <= min(sizes)  # round-robin (j % 2) would give 2,211,840 vs 1,327,104
    assert owners == balanced_owners(sizes, 2)  # deterministic: every rank computes the same owners
    assert balanced_owners(sizes, 1) == [0] * 7 and sorted(set(balanced_owners(sizes, 8))) == list(range(7))
