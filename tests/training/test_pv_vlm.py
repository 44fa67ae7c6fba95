"""PV-Tuning on a tiny InternVL: batches with pixel_values and image tokens, labels masked to the answer; the
teacher gets the same inputs."""

import torch
from transformers import AutoModelForImageTextToText

import riverone_hf  # noqa: F401
from riverone_hf import AqlmLinear, RiverOneConfig
from riverone_hf.training import PVTrainer, PVTuningConfig, get_pv_model
from tests.tiny_models import FAST_AQLM, PV_SCHEME, save_dense, tiny_internvl
from tests.training.test_pv_tuning import pv_args

IMAGE_TOKEN = 5


class ImageQA(torch.utils.data.Dataset):
    """[image tokens][question][answer]: labels only on the answer."""

    def __init__(self, image_tokens: int, n: int = 8):
        g = torch.Generator().manual_seed(0)
        self.items = []
        for _ in range(n):
            question, answer = torch.randint(10, 97, (6,), generator=g), torch.randint(10, 97, (4,), generator=g)
            ids = torch.cat([torch.full((image_tokens,), IMAGE_TOKEN), question, answer])
            labels = torch.full_like(ids, -100)
            labels[-answer.numel():] = answer
            self.items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                               "pixel_values": torch.randn(3, 28, 28, generator=g)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def image_token_count(model) -> int:
    config = model.config
    patches = (config.vision_config.image_size[0] // config.vision_config.patch_size[0]) ** 2
    return int(patches * config.downsample_ratio**2)


def test_pv_tuning_on_internvl_batches(tmp_path):
    dense_dir = save_dense(tiny_internvl(), tmp_path / "dense")
    student = AutoModelForImageTextToText.from_pretrained(
        dense_dir, quantization_config=RiverOneConfig(aqlm={**PV_SCHEME, **FAST_AQLM}))
    assert any(isinstance(m, AqlmLinear) for m in student.modules())
    teacher = AutoModelForImageTextToText.from_pretrained(dense_dir)
    model = get_pv_model(student, PVTuningConfig(code_lr=0.3, max_code_change_per_step=0.05, beam_size=2))
    vision = [p for n, p in model.named_parameters() if "vision_tower" in n and p.ndim > 1]
    assert vision and not any(p.requires_grad for p in vision)  # dense vision weights stay frozen
    before = {n: m.codes.clone() for n, m in model.named_modules() if isinstance(m, AqlmLinear)}
    data = ImageQA(image_token_count(model))
    trainer = PVTrainer(model=model, teacher_model=teacher, train_dataset=data, eval_dataset=data,
                        args=pv_args(tmp_path, max_steps=2, per_device_train_batch_size=4,
                                     per_device_eval_batch_size=4, remove_unused_columns=False))
    trainer.train()
    assert len(trainer.monotonicity) == 2
    assert all(r["before"] > 0 for r in trainer.monotonicity)  # KL on the answer positions
    changed = sum(int((m.codes != before[n]).any(-1).sum()) for n, m in model.named_modules()
                  if isinstance(m, AqlmLinear))
    assert changed > 0
