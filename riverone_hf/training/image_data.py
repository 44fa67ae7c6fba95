"""Real images for distillation: a local image folder, a local `datasets` directory, or the photographs
shipped inside scikit-image (`skimage.data`, no download). Never random noise.

Images become `pixel_values` through seeded random resized crops (+ horizontal flips) at the vision
tower's input size, normalised with the checkpoint's `preprocessor_config.json` mean/std when it has one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SKIMAGE = "skimage"
# Photographs (and scanned pages) in skimage.data that ship with the package; no drawings, no noise.
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "rocket", "text",
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_images(source: str, image_column: str = "image", split: str = "train") -> list[Image.Image]:
    """Images from `source`: "skimage", a directory written by `datasets` `save_to_disk`, or a folder of
    image files (searched recursively, sorted by path)."""
    if source == SKIMAGE:
        try:
            import skimage.data
        except ImportError as err:
            raise ImportError(
                "the 'skimage' image source needs scikit-image: pip install 'riverone_hf[minivit]'"
            ) from err

        return [Image.fromarray(np.asarray(getattr(skimage.data, name)())) for name in SKIMAGE_PHOTOS]
    path = Path(source)
    if not path.is_dir():
        raise ValueError(f"image source {source!r} is neither {SKIMAGE!r} nor an existing directory")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"{source}: no split {split!r}; splits: {sorted(data)}")
            data = data[split]
        if image_column not in data.column_names:
            raise ValueError(f"{source}: no column {image_column!r}; columns: {data.column_names}")
        return [img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img)) for img in data[image_column]]
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{source}: no image files ({sorted(IMAGE_SUFFIXES)}) found")
    return [Image.open(p) for p in files]


@dataclass
class ImagePreprocessing:
    """Input size, channels and normalisation of a vision tower."""

    size: tuple[int, int]
    channels: int = 3
    mean: tuple[float, ...] | None = None  # default 0.5 per channel
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        self.mean = tuple(self.mean or (0.5,) * self.channels)
        self.std = tuple(self.std or (0.5,) * self.channels)
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"`mean`/`std` need {self.channels} values (one per channel), got {self.mean} / {self.std}")

    @classmethod
    def for_tower(cls, tower_config, model_dir: str | None = None) -> ImagePreprocessing:
        size = tower_config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        processor = Path(model_dir) / "preprocessor_config.json" if model_dir else None
        stored = json.loads(processor.read_text()) if processor is not None and processor.exists() else {}
        return cls(size, getattr(tower_config, "num_channels", 3), stored.get("image_mean"), stored.get("image_std"))

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("L" if self.channels == 1 else "RGB").resize(self.size[::-1], Image.BILINEAR)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        array = array.unsqueeze(0) if array.ndim == 2 else array.permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return (array - mean) / std


def _random_crop(image: Image.Image, generator: torch.Generator) -> Image.Image:
    width, height = image.size
    scale, log_ratio = torch.rand(2, generator=generator).tolist()
    area = width * height * (0.25 + 0.75 * scale)
    ratio = math.exp(math.log(3 / 4) + log_ratio * math.log(16 / 9))
    w = max(1, min(width, round(math.sqrt(area * ratio))))
    h = max(1, min(height, round(math.sqrt(area / ratio))))
    left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
    top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
    crop = image.crop((left, top, left + w, top + h))
    if torch.rand(1, generator=generator).item() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return crop


def crop_batches(images: list[Image.Image], preprocessing: ImagePreprocessing, batch_size: int,
                 num_batches: int, seed: int = 0) -> list[torch.Tensor]:
    """`num_batches` tensors [batch_size, C, H, W] of seeded random crops of `images`."""
    if not images:
        raise ValueError("no images to crop")
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        picks = torch.randint(0, len(images), (batch_size,), generator=generator).tolist()
        batches.append(torch.stack([preprocessing.to_tensor(_random_crop(images[i], generator)) for i in picks]))
    return batches
