"""MiniViT distillation: the loss goes down on held-out images, the weights are applied, only per-block
parameters train, the image sources load, and the recipe runs end to end from a YAML file."""

import importlib.util
import os
import sys

import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from transformers import ViTForImageClassification

import riverone_hf  # noqa: F401  (registers quant_method "riverone")
from riverone_hf import RiverOneConfig
from riverone_hf.modeling.vision_blocks import find_vision_tower
from riverone_hf.training import DistillConfig, distill_minivit, evaluate_distillation
from riverone_hf.training.image_data import ImagePreprocessing, crop_batches, load_images
from tests.tiny_models import pixel_values

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "distill_minivit.py")


def drawings(count: int = 6) -> list[Image.Image]:
    """Structured test pictures (circles, bars, outlines), not noise."""
    images = []
    for i in range(count):
        image = Image.new("RGB", (48, 40), (20 * i, 30, 200 - 25 * i))
        draw = ImageDraw.Draw(image)
        draw.ellipse((4 + 3 * i, 5, 30 + 2 * i, 30), fill=(250, 250 - 30 * i, 40))
        draw.rectangle((30, 2 + 4 * i, 44, 12 + 4 * i), outline=(0, 0, 0), width=2)
        draw.line((0, 39, 47, 5 * i), fill=(255, 255, 255), width=3)
        images.append(image)
    return images


@pytest.fixture
def pair(vit_dir):
    teacher = ViTForImageClassification.from_pretrained(vit_dir).eval()
    student = ViTForImageClassification.from_pretrained(
        vit_dir, quantization_config=RiverOneConfig(minivit={"groups": [[0, 1], [2, 3]]})
    )
    return student, teacher


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i, image in enumerate(drawings()):
        image.save(folder / f"{i}.png")
    return str(folder)


def test_distillation_lowers_held_out_loss_and_trains_only_per_block_parameters(pair, tmp_path):
    import datasets

    data_dir = tmp_path / "ds"
    datasets.Dataset.from_dict({"image": drawings()}).cast_column("image", datasets.Image()).save_to_disk(str(data_dir))
    images = load_images(str(data_dir))
    student, teacher = pair
    preprocessing = ImagePreprocessing.for_tower(student.config)
    train, held = crop_batches(images[:4], preprocessing, 8, 4, seed=0), crop_batches(images[4:], preprocessing, 8, 2, seed=1)
    shared_before = {n: p.detach().clone() for n, p in student.named_parameters() if "attention.q_proj" in n}
    config = DistillConfig(steps=16, lr=3e-2, log_every=100)
    before = evaluate_distillation(student, teacher, held, config)
    result = distill_minivit(student, teacher, train, config)
    after = evaluate_distillation(student, teacher, held, config)
    assert after.total < 0.8 * before.total, (before, after)
    assert result.history[-1].total < result.history[0].total
    tower = find_vision_tower(student)
    per_block = 4 * (2 * 4 * 4 + 32 * 9 + 32) + 4 * 4 * 32  # transforms + two LayerNorms (weight, bias) per block
    assert result.trained_parameters == per_block
    assert all(torch.equal(p, shared_before[n]) for n, p in student.named_parameters() if n in shared_before)
    assert all(p.requires_grad for p in student.parameters()), "requires_grad is restored"
    assert tower.attention(0).config._attn_implementation == "riverone_minivit"
    assert find_vision_tower(teacher).attention(0).config._attn_implementation == "sdpa", "teacher restored"


def test_train_shared_also_moves_the_shared_weights(pair):
    student, teacher = pair
    weight = student.vit.layers[0].attention.q_proj.weight.detach().clone()
    batches = [pixel_values(batch=4, seed=s) for s in range(2)]
    result = distill_minivit(student, teacher, batches, DistillConfig(steps=2, train_shared=True, shared_lr=1e-2))
    assert not torch.equal(student.vit.layers[0].attention.q_proj.weight, weight)
    assert student.vit.layers[1].attention.q_proj.weight is student.vit.layers[0].attention.q_proj.weight
    assert result.trained_parameters > 2 * 4 * 32 * 32


def test_loss_weights_are_applied(pair):
    student, teacher = pair
    with torch.no_grad():  # a student that differs from the teacher in all three losses
        for name, parameter in student.named_parameters():
            if "minivit_mix" in name:
                parameter.add_(0.3)
    batches = [pixel_values(batch=4)]
    parts = evaluate_distillation(student, teacher, batches)
    assert min(parts.prediction, parts.attention, parts.hidden) > 0
    weighted = evaluate_distillation(student, teacher, batches, DistillConfig(prediction_weight=2, attention_weight=3,
                                                                              hidden_weight=5))
    expected = 2 * parts.prediction + 3 * parts.attention + 5 * parts.hidden
    assert weighted.total == pytest.approx(expected, rel=1e-5)
    only_attention = evaluate_distillation(student, teacher, batches, DistillConfig(prediction_weight=0, hidden_weight=0))
    assert only_attention.total == pytest.approx(parts.attention, rel=1e-5)
    with pytest.raises(ValueError, match="`temperature`"):
        DistillConfig(temperature=0)


def test_image_sources(image_folder, tmp_path):
    assert len(load_images(image_folder)) == 6
    with pytest.raises(ValueError, match="no image files"):
        load_images(str(tmp_path))
    with pytest.raises(ValueError, match="neither"):
        load_images(str(tmp_path / "missing"))
    batch = crop_batches(load_images(image_folder), ImagePreprocessing((28, 28), channels=1), 3, 1)[0]
    assert batch.shape == (3, 1, 28, 28) and batch.std() > 0.1


def test_skimage_photos_are_the_default_real_images():
    images = load_images("skimage")
    assert len(images) == 16 and all(min(i.size) >= 150 for i in images)


def test_recipe_runs_from_yaml_and_saves_a_reloadable_checkpoint(vit_dir, image_folder, tmp_path):
    config = {
        "model": vit_dir, "output_dir": str(tmp_path / "out"), "groups": [[1, 2]], "data": image_folder,
        "batch_size": 4, "eval_batches": 1, "steps": 3, "lr": 1e-2, "attention_weight": 2.0,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(config))
    spec = importlib.util.spec_from_file_location("distill_minivit_recipe", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe
    spec.loader.exec_module(recipe)
    args, distill_config = recipe.parse([str(tmp_path / "recipe.yaml")])
    assert args.groups == [[1, 2]] and distill_config.attention_weight == 2.0
    student, _, _ = recipe.run(args, distill_config)
    again = ViTForImageClassification.from_pretrained(tmp_path / "out")
    assert again.vit.layers[2].mlp.fc1.weight is again.vit.layers[1].mlp.fc1.weight
    with torch.no_grad():
        assert torch.equal(again(pixel_values=pixel_values()).logits, student.eval()(pixel_values=pixel_values()).logits)
