"""`riverone` console script: a thin layer over the library (quantize, export, import, evaluate, verify, demo)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys


def _quantize(args) -> None:
    from ..config import RiverOneConfig, load_config_file
    from ..metrics.sizes import size_report
    from .pipeline import parse_dtype, quantize_checkpoint, stage_reports

    config = load_config_file(args.config) if args.config else RiverOneConfig(aqlm={})
    model = quantize_checkpoint(args.src, args.out, config, dtype=parse_dtype(args.dtype), overwrite=args.overwrite)
    print(f"wrote {args.out}")
    print("\n".join(stage_reports(model)))
    print("\n".join(size_report(model).lines()))


def _export(args) -> None:
    from ..export.aqlm import export_aqlm

    export_aqlm(args.src, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} (format {args.format}: loads with stock transformers + the aqlm package)")


def _import(args) -> None:
    from ..export.aqlm import import_aqlm

    config = import_aqlm(args.src, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} (riverone checkpoint of {len(config.quantization_map)} AQLM Linears from {args.format}: "
          "`import riverone_hf` to load it)")


def _evaluate(args) -> None:
    import shlex

    from ..metrics.evaluation import RESULTS_FILE, evaluate_checkpoint
    from ..metrics.image_qa import load_image_qa_examples

    optional = {"--max-windows": args.max_windows, "--image-text": args.image_text,
                "--max-examples": args.max_examples, "--question": args.question, "--system": args.system}
    command = shlex.join(["riverone", "evaluate", args.path, "--text", args.text, "--seq-len", str(args.seq_len),
                          "--batch-size", str(args.batch_size)]
                         + (["--split", args.split] if args.image_text else [])
                         + [item for flag, value in optional.items() if value is not None
                            for item in (flag, str(value))])
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"`--max-examples` must be >= 1, got {args.max_examples}")
    image_text = None
    if args.image_text:
        image_text = load_image_qa_examples(args.image_text, args.split).head(args.max_examples)
    results = evaluate_checkpoint(args.path, args.text, seq_len=args.seq_len, max_windows=args.max_windows,
                                  batch_size=args.batch_size, image_text=image_text, question=args.question,
                                  system=args.system, command=command)
    for e in results["evaluations"]:
        s = e["settings"]
        print(f"{e['metric']}: {e['value']:.4f} on {e['dataset']['name']} (sha256 {e['dataset']['sha256'][:12]}..., "
              f"{s['num_windows']} windows x {s['seq_len']} tokens, {s['num_predicted_tokens']} predicted tokens)")
    for e in results.get("task_evaluations", []):
        print(f"{e['metric']}: {e['value']:.4f} on {e['dataset']['name']} (sha256 {e['dataset']['sha256'][:12]}..., "
              f"{e['dataset']['num_examples']} examples, {len(e['settings']['candidates'])} candidates)")
    print(f"wrote {args.path}/{RESULTS_FILE}")


def _verify(args) -> None:
    import time

    from ..integrity import verify_checkpoint

    start = time.perf_counter()
    report = verify_checkpoint(args.path)
    seconds = time.perf_counter() - start
    if not report["hashed"]:
        raise ValueError(f"{args.path} records no riverone hashes (saved by an older riverone_hf): nothing to "
                         "verify against; re-save it with save_pretrained to record them")
    print(f"{args.path}: OK, {report['tensors']} tensors in {report['files']} file(s), "
          f"{report['bytes'] / 2**20:.1f} MiB hashed in {seconds:.2f} s (sha256)")


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(out=args.out, overwrite=args.overwrite, block_finetune=args.block_finetune)


def _conversion(sub, name: str, func, help: str, src_help: str) -> None:
    """A format-conversion subcommand (export, import): SRC OUT --format aqlm [--overwrite]."""
    parser = sub.add_parser(name, help=help)
    parser.add_argument("src", help=src_help)
    parser.add_argument("out", help="output directory (written atomically)")
    parser.add_argument("--format", required=True, choices=["aqlm"], help="aqlm: stock transformers AqlmConfig")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="riverone", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    sub = parser.add_subparsers(dest="command", required=True)

    quantize = sub.add_parser("quantize", help="compress a dense checkpoint directory")
    quantize.add_argument("src", help="dense transformers checkpoint directory")
    quantize.add_argument("out", help="output directory (written atomically)")
    quantize.add_argument("--config", help="YAML file of RiverOneConfig fields (default: aqlm with its defaults)")
    quantize.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                          help="dtype of the loaded model and of codebooks/scales (default float32)")
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    quantize.set_defaults(func=_quantize)

    _conversion(sub, "export", _export, "export a riverone checkpoint to another format",
                "riverone checkpoint directory")
    _conversion(sub, "import", _import, "turn a checkpoint of another format into a riverone checkpoint",
                "checkpoint directory (aqlm: transformers' AQLM integration, quant_method aqlm)")

    evaluate = sub.add_parser("evaluate", help="measure a checkpoint; write riverone_results.json beside it")
    evaluate.add_argument("path", help="checkpoint directory (riverone or dense)")
    evaluate.add_argument("--text", required=True, help="UTF-8 held-out text file (not the calibration text)")
    evaluate.add_argument("--seq-len", type=int, default=512, help="tokens per perplexity window (default 512)")
    evaluate.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    evaluate.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    evaluate.add_argument("--image-text", default=None,
                          help="vision-language models: a `datasets` folder (image, answer[, question]) for the "
                               "image-text agreement metric")
    evaluate.add_argument("--split", default="test", help="split of --image-text (default test)")
    evaluate.add_argument("--max-examples", type=int, default=None,
                          help="measure only the first N image-text examples")
    evaluate.add_argument("--question", default=None, help="the prompt's question when the data has no question column")
    evaluate.add_argument("--system", default=None, help="optional system turn of the prompt")
    evaluate.set_defaults(func=_evaluate)

    verify = sub.add_parser("verify", help="check a riverone checkpoint's files against the hashes saved with it")
    verify.add_argument("path", help="riverone checkpoint directory")
    verify.set_defaults(func=_verify)

    demo = sub.add_parser("demo", help="quantize SmolLM2-135M on shipped text and report size and perplexity")
    demo.add_argument("--out", default=None, help="also save the quantized model here")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    demo.add_argument("--block-finetune", action="store_true",
                      help="also fine-tune each block (better perplexity; 9 min 22 s measured, near the budget)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up like Ctrl-C
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        args.func(args)
    except (ValueError, ImportError) as err:
        print(f"riverone {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"riverone {args.command}: interrupted; the output directory was left as it was before "
              "(nothing partially written)", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
