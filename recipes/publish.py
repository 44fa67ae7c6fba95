"""Publish a measured riverone checkpoint folder to the Hub, with its model card, in one commit.

    riverone evaluate OUT --text held_out.txt
    python recipes/publish.py OUT --repo-id org/SmolLM2-135M-riverone-2x8 [--private] [--revision main]

The folder is checked (riverone config, weights, tokenizer, riverone_results.json measured on these weights)
before any network call. The token comes from the usual huggingface_hub places (HF_TOKEN, `hf auth login`)
and is never printed. Set HF_ENDPOINT for another Hub.
"""

from __future__ import annotations

import argparse
import sys


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="riverone checkpoint folder (with riverone_results.json)")
    parser.add_argument("--repo-id", required=True, help="namespace/name on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    parser.add_argument("--base-model", default=None, help="Hub id of the dense model this was compressed from")
    parser.add_argument("--license", default=None, help="license (default: copied from the base model's card)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from riverone_hf.hub import HubError, publish

    try:
        result = publish(args.folder, args.repo_id, private=args.private, revision=args.revision,
                         base_model=args.base_model, license=args.license)
    except (ValueError, HubError) as error:
        print(f"publish: error: {error}", file=sys.stderr)
        return 2
    print(f"repo: {result.repo_url}")
    print(f"commit: {result.commit_oid} ({result.commit_url}) on {result.revision}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
