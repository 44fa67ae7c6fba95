"""Which transformers Auto class loads a checkpoint: the one place the CLI, the recipes and the evaluation ask."""

from __future__ import annotations


def auto_model_class(path: str):
    """AutoModelForImageTextToText for vision-language configs, AutoModelForCausalLM otherwise. ValueError when
    `path` is neither a checkpoint folder nor a reachable Hub repo id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise ValueError(f"source {path!r} is neither a checkpoint folder (with config.json) nor a Hub repo id "
                         f"that can be reached: {err}") from err
    return AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
