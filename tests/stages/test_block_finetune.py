"""Block fine-tuning (riverone_hf.stages.block_finetune) and true-sequential order in the calibrated AQLM flow,
on tiny Qwen3 / InternVL: fine-tuning lowers each block's output error towards the dense block, never changes
the codes, stops early on the held-out windows and keeps the best parameters, the CPU kernel then uses the
new codebooks; true-sequential collects XᵀX after the earlier Linears of the block are replaced; the spec
validates its fields and round-trips through RiverOneConfig's JSON."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from riverone_hf import RiverOneConfig
from riverone_hf.modeling.aqlm_linear import AqlmLinear
from riverone_hf.stages.aqlm import AqlmSpec, plan_modules, quantize_linear
from riverone_hf.stages.block_finetune import (
    ActivationStore,
    BlockFinetuneSpec,
    split_windows,
    trainable_parameters,
)
from riverone_hf.stages.sequential import call_order_groups, quantize_sequentially
from tests.stages.test_sequential import Recorder, assert_xtx_close, reference_xtx, zero_linear
from tests.tiny_models import FAST_AQLM, tiny_internvl, tiny_qwen3

WINDOWS = torch.randint(1, 128, (8, 16), generator=torch.Generator().manual_seed(3))  # 8 windows x 16 tokens
CALIBRATION = {"text_files": ["unused.txt"]}  # the windows are passed directly; the file is never read
SCHEME = {"num_codebooks": 1, "nbits_per_codebook": 4, "in_group_size": 8, **FAST_AQLM}
BLOCK0 = r"model\.layers\.0\..*_proj"


class CodeRecorder:
    """A `quantize` callback doing the AQLM stage's work and keeping a copy of each module's codes."""

    def __init__(self, model, plan):
        self.model, self.plan, self.codes = model, plan, {}

    def __call__(self, name, xtx):
        module = quantize_linear(self.model.get_submodule(name), self.plan[name], xtx)
        self.codes[name] = module.codes.detach().clone()
        self.model.set_submodule(name, module)


def quantize(model, target=BLOCK0, windows=WINDOWS, true_sequential=False, **finetune):
    spec = AqlmSpec(**SCHEME, target_modules=target, calibration=CALIBRATION, true_sequential=true_sequential,
                    block_finetune={"enabled": bool(finetune), **finetune})
    plan = plan_modules(model, spec)
    recorder = CodeRecorder(model, plan)
    results = quantize_sequentially(model, list(plan), windows, recorder, "AQLM", true_sequential=true_sequential,
                                    finetune=spec.block_finetune)
    return recorder, results


def test_finetuning_lowers_the_block_error_and_keeps_the_codes(caplog):
    model = tiny_qwen3()
    with caplog.at_level(logging.INFO, logger="riverone_hf.stages.sequential"):
        # no held-out windows: the error is measured on the training windows (8 random windows of a random
        # model do not generalise; see the early-stop test for the held-out split)
        recorder, results = quantize(model, r"model\.layers\.[01]\..*_proj", lr=1e-3, max_epochs=4,
                                     relative_tolerance=0.0, batch_size=1, held_out_fraction=0.0)
    assert set(results) == {0, 1}
    for result in results.values():
        assert result.epochs == 4 and result.held_out == 0 and result.error_after < 0.9 * result.error_before
    for name, codes in recorder.codes.items():  # what the engine chose, untouched by fine-tuning
        assert torch.equal(model.get_submodule(name).codes, codes)
    messages = [r.getMessage() for r in caplog.records]
    assert any("block 0: relative output error" in m and "after" in m for m in messages)
    assert any("fine-tuning summary" in m for m in messages)


def test_finetuned_block_error_measured_against_the_dense_block():
    """The returned held-out error is the quantized block's error against the DENSE block on the same inputs."""
    dense, model = tiny_qwen3(), tiny_qwen3()
    _, results = quantize(model, lr=1e-2, max_epochs=3, relative_tolerance=0.0, held_out_fraction=0.25,
                          activation_dtype="float32")
    _, held = split_windows(len(WINDOWS), 0.25, 0)
    inputs = {}
    hook = dense.model.layers[0].register_forward_pre_hook(lambda m, a, k: inputs.setdefault("call", (a, k)),
                                                           with_kwargs=True)
    num = den = 0.0
    with torch.no_grad():
        for i in held:
            inputs.clear()
            dense(input_ids=WINDOWS[i][None], use_cache=False)
            args, kwargs = inputs["call"]
            ref = dense.model.layers[0](*args, **kwargs)
            out = model.model.layers[0](*args, **kwargs)
            ref, out = (ref[0] if isinstance(ref, tuple) else ref), (out[0] if isinstance(out, tuple) else out)
            num += (out.double() - ref.double()).square().sum().item()
            den += ref.double().square().sum().item()
    hook.remove()
    assert num / den == pytest.approx(results[0].error_after, rel=1e-4)


def _layer_outputs(model, layer, windows):
    """Output of decoder layer `layer` of `model` on each window, in float64."""
    outputs = []
    hook = model.model.layers[layer].register_forward_hook(
        lambda m, a, out: outputs.append((out[0] if isinstance(out, tuple) else out).double()))
    with torch.no_grad():
        for window in windows:
            model(input_ids=window[None], use_cache=False)
    hook.remove()
    return outputs


def test_model_targets_fit_each_block_to_the_dense_models_activations():
    """With `targets="model"` the held-out error of block 1 is against the DENSE model's layer-1 output (dense
    inputs through dense blocks), not the dense block on the quantized block 0's outputs; block 0, whose inputs
    are the same in both streams, is fine-tuned exactly as with `targets="block"`."""
    dense, model, by_block = tiny_qwen3(), tiny_qwen3(), tiny_qwen3()
    settings = dict(lr=1e-2, max_epochs=3, relative_tolerance=0.0, held_out_fraction=0.25, activation_dtype="float32")
    _, results = quantize(model, r"model\.layers\.[01]\..*_proj", targets="model", **settings)
    _, block_results = quantize(by_block, r"model\.layers\.[01]\..*_proj", targets="block", **settings)
    _, held = split_windows(len(WINDOWS), 0.25, 0)
    ref, out = _layer_outputs(dense, 1, WINDOWS[held]), _layer_outputs(model, 1, WINDOWS[held])
    error = sum((o - r).square().sum().item() for o, r in zip(out, ref)) / sum(r.square().sum().item() for r in ref)
    assert error == pytest.approx(results[1].error_after, rel=1e-4)
    assert results[0] == block_results[0]
    assert results[1].error_before != block_results[1].error_before


def test_early_stop_on_the_held_out_windows_keeps_the_best_parameters():
    model = tiny_qwen3()
    recorder, results = quantize(model, lr=1.0, max_epochs=20, relative_tolerance=0.0)  # far too large a step
    result = results[0]
    assert result.epochs == 1  # the held-out error rose after the first epoch: stop
    assert result.error_after == result.error_before  # and the starting parameters are restored


def test_split_windows():
    train, held = split_windows(8, 0.125, 0)
    assert len(held) == 1 and sorted(train + held) == list(range(8))
    assert split_windows(8, 0.125, 0) == (train, held) and split_windows(8, 0.0, 0) == (list(range(8)), [])
    assert split_windows(1, 0.5, 0) == ([0], [])


def test_trainable_kinds_never_include_codes_or_dense_weights():
    model = tiny_qwen3()
    block = model.model.layers[0]
    block.mlp.up_proj = quantize_linear(block.mlp.up_proj, AqlmSpec(**SCHEME))
    names = set(trainable_parameters(block, ["codebooks", "scales", "norms", "biases"]))
    assert {"mlp.up_proj.codebooks", "mlp.up_proj.scales", "input_layernorm.weight"} <= names
    assert not any(n.endswith("codes") or n.endswith("q_proj.weight") for n in names)
    assert set(trainable_parameters(block, ["scales"])) == {"mlp.up_proj.scales"}


def test_no_grad_cpu_forward_uses_the_finetuned_codebooks():
    model = tiny_qwen3()
    name = "model.layers.0.mlp.down_proj"
    spec = AqlmSpec(**{**SCHEME, "nbits_per_codebook": 8, "num_codebooks": 2})  # 2x8: the lookup-table kernel
    x = torch.randn(3, model.get_submodule(name).in_features)
    before = {}

    def quantize_and_prime(module_name, xtx):
        module = quantize_linear(model.get_submodule(module_name), spec, xtx)
        model.set_submodule(module_name, module)
        with torch.no_grad():
            before["out"] = module(x)  # prepares and caches the CPU kernel for the codebooks before fine-tuning

    quantize_sequentially(model, [name], WINDOWS, quantize_and_prime, "AQLM",
                          finetune=BlockFinetuneSpec(enabled=True, lr=1e-3, max_epochs=2, relative_tolerance=0.0,
                                                     held_out_fraction=0.0))
    module = model.get_submodule(name)
    with torch.no_grad():
        after = module(x)
        torch.testing.assert_close(after, F.linear(x, module.dequantize(), module.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before["out"], atol=1e-4)  # the codebooks did change


def test_finetuning_works_on_internvl_language_model():
    model = tiny_internvl()
    _, results = quantize(model, r"model\.language_model\.layers\.1\.mlp\..*_proj", lr=1e-3, max_epochs=2,
                          relative_tolerance=0.0, held_out_fraction=0.0)
    assert set(results) == {1} and results[1].error_after < results[1].error_before


def test_offloaded_activations_are_files_and_are_removed(tmp_path):
    store = ActivationStore(torch.float16, offload_dir=str(tmp_path), name="inputs")
    values = [torch.randn(1, 4, 8) for _ in range(3)]
    for v in values:
        store.append(v)
    assert len(store) == 3 and len(list(tmp_path.rglob("*.safetensors"))) == 3
    assert store[1].dtype == torch.float16 and torch.allclose(store[1].float(), values[1], atol=1e-3)
    store.close()
    assert not list(tmp_path.iterdir())


def test_offload_dir_gives_the_same_result_as_ram(tmp_path):
    a, b = tiny_qwen3(), tiny_qwen3()
    settings = {"lr": 1e-2, "max_epochs": 2, "relative_tolerance": 0.0}
    quantize(a, **settings)
    quantize(b, offload_dir=str(tmp_path), **settings)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert not list(tmp_path.iterdir())


# ---- true-sequential ---------------------------------------------------------------------------------------

QKV = tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
O_PROJ = "model.layers.0.self_attn.o_proj"


def test_call_order_groups_of_a_qwen3_block():
    model = tiny_qwen3()
    names = {n: m for n, m in model.named_modules() if n.startswith("model.layers.0.") and n.endswith("_proj")}
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=WINDOWS[:1], use_cache=False)
        args, kwargs = calls[0]
        groups = call_order_groups(names, lambda: model.model.layers[0](*args, **kwargs))
    short = [[n.rsplit(".", 1)[-1] for n in g] for g in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


@pytest.mark.parametrize("true_sequential", [False, True], ids=["together", "true-sequential"])
def test_true_sequential_collects_xtx_after_the_earlier_linears_are_replaced(true_sequential):
    model = tiny_qwen3()
    recorder = Recorder(model, zero=QKV)
    quantize_sequentially(model, [*QKV, O_PROJ], WINDOWS[:2], recorder, "TEST", true_sequential=true_sequential)
    assert [n for n, _ in recorder.calls][:3] == list(QKV)
    dense = tiny_qwen3()
    for name in QKV:  # the first group sees the dense block
        assert_xtx_close(recorder.xtx[name], reference_xtx(dense, name, WINDOWS[:2]))
    replaced = tiny_qwen3()
    for name in QKV:
        replaced.set_submodule(name, zero_linear(replaced.get_submodule(name)))
    expected = reference_xtx(replaced if true_sequential else dense, O_PROJ, WINDOWS[:2])
    assert_xtx_close(recorder.xtx[O_PROJ], expected)


# ---- config ------------------------------------------------------------------------------------------------

def test_spec_round_trips_through_config_json():
    config = RiverOneConfig(aqlm={"calibration": {"text_files": ["a.txt"]}, "true_sequential": True,
                                  "block_finetune": {"enabled": True, "lr": 3e-4, "train": ["codebooks", "norms"],
                                                     "offload_dir": "/tmp"}})
    again = RiverOneConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and isinstance(again.aqlm.block_finetune, BlockFinetuneSpec)
    assert again.aqlm.block_finetune.train == ["codebooks", "norms"] and again.aqlm.true_sequential is True
    assert RiverOneConfig(aqlm={}).aqlm.block_finetune == BlockFinetuneSpec()  # disabled by default


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"block_finetune": {"enabled": "yes"}}, r"block_finetune\.enabled"),
        ({"block_finetune": {"max_epochs": -1}}, r"block_finetune\.max_epochs"),
        ({"block_finetune": {"lr": 0}}, r"block_finetune\.lr"),
        ({"block_finetune": {"batch_size": 0}}, r"block_finetune\.batch_size"),
        ({"block_finetune": {"relative_tolerance": 1.5}}, r"block_finetune\.relative_tolerance"),
        ({"block_finetune": {"held_out_fraction": 1.0}}, r"block_finetune\.held_out_fraction"),
        ({"block_finetune": {"train": ["codes"]}}, r"block_finetune\.train"),
        ({"block_finetune": {"train": []}}, r"block_finetune\.train"),
        ({"block_finetune": {"activation_dtype": "int8"}}, r"block_finetune\.activation_dtype"),
        ({"block_finetune": {"targets": "layer"}}, r"block_finetune\.targets"),
        ({"block_finetune": {"epochs": 3}}, r"`block_finetune` has unknown field"),
        ({"block_finetune": 3}, r"`block_finetune` must be a dict"),
        ({"true_sequential": 1}, r"`true_sequential`"),
        ({"true_sequential": True, "calibration": None}, r"`true_sequential` needs `calibration`"),
        ({"block_finetune": {"enabled": True}, "calibration": None}, r"`block_finetune\.enabled` needs `calibration`"),
    ],
    ids=["enabled", "epochs", "lr", "batch", "tolerance", "held-out", "kind", "no-kind", "dtype", "targets", "unknown",
         "not-dict", "true-seq-type", "true-seq-no-calib", "finetune-no-calib"],
)
def test_invalid_fields_raise_naming_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        AqlmSpec(**{"calibration": CALIBRATION, **fields})


def test_module_replaced_is_an_aqlm_linear_after_the_run():
    model = tiny_qwen3()
    quantize(model, lr=1e-2, max_epochs=1)
    assert isinstance(model.model.layers[0].mlp.down_proj, AqlmLinear)
    block = model.model.layers[0]
    assert not any(p.requires_grad for p in block.mlp.down_proj.parameters())  # flags restored after training
    assert block.input_layernorm.weight.requires_grad  # as nn.Module left it


def test_from_pretrained_with_true_sequential_and_finetuning_reloads_identically(qwen3_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    text = tmp_path / "calib.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 20)
    config = RiverOneConfig(aqlm={**SCHEME, "target_modules": BLOCK0, "true_sequential": True,
                                  "calibration": {"text_files": [str(text)], "num_samples": 4, "seq_len": 32},
                                  "block_finetune": {"enabled": True, "lr": 1e-3, "max_epochs": 2}})
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=config)
    assert isinstance(model.model.layers[0].self_attn.q_proj, AqlmLinear)
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.quantization_config.aqlm.block_finetune.enabled  # recorded in config.json
    ids = WINDOWS[:1]
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_half_precision_block_trains_in_float32_and_stays_half():
    model = tiny_qwen3().to(torch.bfloat16)
    _, results = quantize(model, r"model\.layers\.0\.mlp\..*_proj", lr=1e-3, max_epochs=2, relative_tolerance=0.0,
                          held_out_fraction=0.0)
    block = model.model.layers[0]
    assert block.mlp.up_proj.codebooks.dtype == torch.bfloat16 and block.input_layernorm.weight.dtype == torch.bfloat16
    assert results[0].error_after <= results[0].error_before
