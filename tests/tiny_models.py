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
