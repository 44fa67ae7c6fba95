"""`riverone` console script: a thin layer over the library (quantize, export, demo)."""

from __future__ import annotations

import argparse
import logging
import sys


def _quantize(args) -> None:
    from ..config import RiverOneConfig, load_config_file
    from .pipeline import parse_dtype, quantize_checkpoint
    from ..metrics.sizes import size_report

    config = load_config_file(args.config) if args.config else RiverOneConfig(aqlm={})
    model = quantize_checkpoint(args.src, args.out, config, dtype=parse_dtype(args.dtype), overwrite=args.overwrite)
    print(f"wrote {args.out}")
    print("\n".join(size_report(model).lines()))


def _export(args) -> None:
    from ..export.aqlm import export_aqlm

    export_aqlm(args.src, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} (format {args.format}: loads with stock transformers + the aqlm package)")


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(out=args.out, overwrite=args.overwrite)


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

    export = sub.add_parser("export", help="export a riverone checkpoint to another format")
    export.add_argument("src", help="riverone checkpoint directory")
    export.add_argument("out", help="output directory (written atomically)")
    export.add_argument("--format", required=True, choices=["aqlm"], help="aqlm: stock transformers AqlmConfig")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    export.set_defaults(func=_export)

    demo = sub.add_parser("demo", help="quantize SmolLM2-135M on shipped text and report size and perplexity")
    demo.add_argument("--out", default=None, help="also save the quantized model here")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, ImportError) as err:
        print(f"riverone {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"riverone {args.command}: interrupted; no partial output was left", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
