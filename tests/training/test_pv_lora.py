"""LoRA on AqlmLinear (peft custom module): train with the plain Trainer, save, reload as an adapter, merge."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import riverone_hf  # noqa: F401,E402
from riverone_hf import AqlmLinear  # noqa: E402
from riverone_hf.training.pv.lora import AqlmLoraLinear, merge_to_dense, register_aqlm_lora  # noqa: E402
from tests.tiny_models import input_ids  # noqa: E402
from tests.training.test_pv_tuning import token_dataset  # noqa: E402


def test_lora_train_save_reload_merge(pv_dirs, tmp_path):
    _, quantized = pv_dirs
    config = register_aqlm_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=True))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(quantized), config)
    adapted = [m for m in model.modules() if isinstance(m, AqlmLoraLinear)]
    assert len(adapted) == 4 and all(isinstance(m.get_base_layer(), AqlmLinear) for m in adapted)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=token_dataset()).train()
    assert any(m.lora_B["default"].weight.abs().sum() > 0 for m in adapted)  # trained
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids()).logits
    model.save_pretrained(tmp_path / "adapter")

    base = AutoModelForCausalLM.from_pretrained(quantized)
    reload_config = register_aqlm_lora(LoraConfig.from_pretrained(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter", config=reload_config).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids()).logits, expected, rtol=1e-4, atol=1e-5)
        with pytest.raises(NotImplementedError, match="merge_to_dense"):
            next(m for m in reloaded.modules() if isinstance(m, AqlmLoraLinear)).merge()
        merged = merge_to_dense(reloaded.base_model.model)
        assert not any(isinstance(m, AqlmLoraLinear) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=input_ids()).logits, expected, rtol=1e-4, atol=1e-5)
