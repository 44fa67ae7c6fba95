"""Recipe: MiniViT-share the vision blocks of a dense checkpoint, distil the per-block transforms from the
original model on real images, report sizes and held-out losses, and save the result.

    python recipes/distill_minivit.py recipes/configs/distill_minivit.yaml
    python recipes/distill_minivit.py --model DENSE_DIR --output_dir OUT --share_every 2 --steps 200

Images: `data` is "skimage" (the photographs inside scikit-image), a folder of image files, or a local
`datasets` directory (`save_to_disk`) with an image column. A seeded fraction of the images is held out
and the distillation loss on crops of them is reported before and after training.
The saved checkpoint reloads with `import riverone_hf` + `from_pretrained(OUT)`.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AutoConfig, HfArgumentParser

import riverone_hf  # noqa: F401  (registers quant_method "riverone")
from riverone_hf import RiverOneConfig
from riverone_hf.fileio import check_output_dir
from riverone_hf.modeling.minivit import accounting
from riverone_hf.modeling.vision_blocks import find_vision_tower
from riverone_hf.cli.pipeline import save_with_side_files
from riverone_hf.training import DistillConfig, distill_minivit, evaluate_distillation
from riverone_hf.training.image_data import ImagePreprocessing, crop_batches, load_images


@dataclass
class RecipeArguments:
    """What to share, on which data, and where to write."""

    model: str = field(metadata={"help": "Dense checkpoint directory (also the teacher)."})
    output_dir: str = field(metadata={"help": "Where the distilled riverone checkpoint is written (atomically)."})
    groups: str | None = field(default=None, metadata={"help": "Groups of block indices, JSON, e.g. '[[0,1],[2,3]]' "
                                                               "(a YAML list also works)."})
    share_every: int | None = field(default=None, metadata={"help": "Instead of groups: share every N adjacent blocks."})
    start: int = field(default=0, metadata={"help": "First block of the share_every range."})
    end: int | None = field(default=None, metadata={"help": "End (exclusive) of the share_every range; default: last."})
    transforms: list[str] = field(default_factory=lambda: ["attention", "mlp"],
                                  metadata={"help": "Per-block transforms: attention and/or mlp."})
    conv_kernel_size: int = field(default=3, metadata={"help": "Odd kernel size of the MLP transform's conv."})
    data: str = field(default="skimage", metadata={"help": "'skimage', an image folder, or a local datasets directory."})
    image_column: str = field(default="image", metadata={"help": "Image column of a datasets directory."})
    split: str = field(default="train", metadata={"help": "Split of a datasets directory holding a DatasetDict."})
    held_out_fraction: float = field(default=0.2, metadata={"help": "Fraction of the images held out for evaluation."})
    batch_size: int = field(default=16, metadata={"help": "Images per distillation step."})
    eval_batches: int = field(default=4, metadata={"help": "Batches of held-out crops evaluated before and after."})
    seed: int = field(default=0, metadata={"help": "Seed of the split and of the crops."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output_dir."})

    def __post_init__(self):
        if isinstance(self.groups, str):
            self.groups = json.loads(self.groups)
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"`held_out_fraction` must be in (0, 1), got {self.held_out_fraction!r}")
        for name in ("batch_size", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)!r}")

    def minivit(self) -> dict:
        fields = {"transforms": self.transforms, "conv_kernel_size": self.conv_kernel_size}
        if self.groups is not None:
            return {**fields, "groups": self.groups}
        return {**fields, "share_every": self.share_every, "start": self.start, "end": self.end}


def parse(argv: list[str]) -> tuple[RecipeArguments, DistillConfig]:
    parser = HfArgumentParser((RecipeArguments, DistillConfig))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def split_images(images: list, fraction: float, seed: int) -> tuple[list, list]:
    if len(images) < 2:
        raise ValueError(f"need at least 2 images to hold some out, got {len(images)}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, round(fraction * len(images)))
    return [images[i] for i in order[held:]], [images[i] for i in order[:held]]


def run(args: RecipeArguments, config: DistillConfig):
    check_output_dir(args.output_dir, args.overwrite)
    quantization_config = RiverOneConfig(minivit=args.minivit())
    model_cls = getattr(transformers, AutoConfig.from_pretrained(args.model).architectures[0])
    teacher = model_cls.from_pretrained(args.model).eval()
    student = model_cls.from_pretrained(args.model, quantization_config=quantization_config)
    tower = find_vision_tower(student)
    print(f"MiniViT on {tower.name or type(student).__name__} ({tower.adapter.model_type}), groups "
          f"{quantization_config.minivit.resolve_groups(len(tower.blocks))}:")
    print("\n".join(accounting(student, tower).lines()))

    train_images, held_images = split_images(load_images(args.data, args.image_column, args.split),
                                             args.held_out_fraction, args.seed)
    preprocessing = ImagePreprocessing.for_tower(tower.config, args.model)
    train = crop_batches(train_images, preprocessing, args.batch_size, config.steps, seed=args.seed)
    held = crop_batches(held_images, preprocessing, args.batch_size, args.eval_batches, seed=args.seed + 1)
    print(f"data: {args.data}: {len(train_images)} images to distil on, {len(held_images)} held out; crops of "
          f"{preprocessing.size[0]}x{preprocessing.size[1]}")
    before = evaluate_distillation(student, teacher, held, config)
    result = distill_minivit(student, teacher, train, config)
    after = evaluate_distillation(student, teacher, held, config)
    print(f"trained {result.trained_parameters:,d} parameters for {config.steps} steps "
          f"(weights: prediction {config.prediction_weight}, attention {config.attention_weight}, "
          f"hidden {config.hidden_weight})")
    for label, losses in (("held-out loss before", before), ("held-out loss after", after)):
        print(f"  {label}: total {losses.total:.6f} (prediction {losses.prediction:.6f}, "
              f"attention {losses.attention:.6f}, hidden {losses.hidden:.6f})")

    save_with_side_files(student, args.model, args.output_dir, overwrite=args.overwrite)
    print(f"wrote {args.output_dir} (reload: import riverone_hf; {model_cls.__name__}.from_pretrained(...))")
    return student, before, after


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(*parse(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
