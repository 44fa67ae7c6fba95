"""Tiny random models and an offline tokenizer, built from configs (no Hub access in tests)."""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
)

# Fast settings for the AQ engine in tests: correctness, not quality.
FAST_AQLM = {"beam_size": 1, "max_epochs": 1, "steps_per_epoch": 5, "kmeans_iters": 3}
# The 1x8 g8 scheme the PV-Tuning tests quantize with.
PV_SCHEME = {"num_codebooks": 1, "nbits_per_codebook": 8, "in_group_size": 8}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII + newline."""
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {"[UNK]": 0, **{ch: i + 1 for i, ch in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def qwen3_config(**overrides) -> Qwen3Config:
    fields = dict(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
    )
    return Qwen3Config(**{**fields, **overrides})


def tiny_qwen3(seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(qwen3_config(**overrides)).eval()


def tiny_internvl(seed: int = 0) -> InternVLForConditionalGeneration:
    torch.manual_seed(seed)
    vision = InternVLVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=[28, 28], patch_size=[14, 14],
    )
    config = InternVLConfig(
        vision_config=vision.to_dict(), text_config=qwen3_config().to_dict(), image_token_id=5, downsample_ratio=0.5
    )
    return InternVLForConditionalGeneration(config).eval()


def tiny_vit(seed: int = 0, **overrides) -> ViTForImageClassification:
    """A 4-block ViT classifier on 1x28x28 images, patches of 7 (a 4x4 grid + CLS)."""
    torch.manual_seed(seed)
    fields = dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=28,
        patch_size=7, num_channels=1, num_labels=10,
    )
    return ViTForImageClassification(ViTConfig(**{**fields, **overrides})).eval()


# A 4-block tower on 3x28x28 images, patches of 7, for the CLIP / SigLIP vision models.
VISION_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                "image_size": 28, "patch_size": 7}


def tiny_clip_vision(seed: int = 0) -> CLIPVisionModel:
    """A CLIP vision tower (a CLS token before the patches)."""
    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**VISION_TOWER)).eval()


def tiny_siglip_vision(seed: int = 0) -> SiglipVisionModel:
    """A SigLIP vision tower (patch tokens only, no CLS)."""
    torch.manual_seed(seed)
    return SiglipVisionModel(SiglipVisionConfig(**VISION_TOWER)).eval()


def pixel_values(batch: int = 2, channels: int = 1, size: int = 28, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def save_dense(model, path) -> str:
    """Save `model` and the char tokenizer to `path` (a dense checkpoint directory)."""
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def input_ids(length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 97, (2, length), generator=torch.Generator().manual_seed(seed))


# A chat template short enough for a character-level tokenizer; the assistant turn ends with "<end>".
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m.role[0] }}:{{ m.content }}<end>{% endfor %}"
                      "{% if add_generation_prompt %}a:{% endif %}")
TINY_IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<ctx>"}


def save_tiny_chat_internvl(path, seed: int = 0) -> str:
    """A dense tiny InternVL checkpoint that a chat recipe can run on: the char tokenizer plus InternVL's image
    tokens, an end-of-turn token and a chat template; a 28 x 28 image processor (PIL backend); one context token
    per image (`processor_config.json`)."""
    import json
    import os

    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from transformers import AutoTokenizer

    base = char_tokenizer()
    base.add_special_tokens({"eos_token": "<end>", "pad_token": "<end>",
                             "additional_special_tokens": list(TINY_IMAGE_TOKENS.values())})
    base.chat_template = TINY_CHAT_TEMPLATE
    base.save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path, extra_special_tokens=TINY_IMAGE_TOKENS)  # InternVL's named tokens
    model = tiny_internvl(seed)
    model.config.image_token_id = tokenizer.convert_tokens_to_ids("<ctx>")
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=False).save_pretrained(path)
    with open(os.path.join(path, "processor_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"processor_class": "InternVLProcessor", "image_seq_length": 1}, handle)
    return str(path)


def save_image_answer_dataset(path, train: int = 8, test: int = 4, seed: int = 0) -> str:
    """A local `datasets` directory: train/test splits of random 28 x 28 images with one-digit answers."""
    import numpy as np
    from datasets import Dataset, DatasetDict
    from PIL import Image

    rng = np.random.default_rng(seed)

    def split(n):
        images = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(n)]
        return Dataset.from_dict({"image": images, "answer": [str(i % 10) for i in range(n)]})

    DatasetDict({"train": split(train), "test": split(test)}).save_to_disk(str(path))
    return str(path)
