"""Publishing riverone checkpoints to a Hub and their model cards (huggingface_hub)."""

from .card import TEMPLATE_PATH, card_data, render_card
from .publish import HubError, PublishResult, check_checkpoint, check_hub_access, publish

__all__ = ["HubError", "PublishResult", "TEMPLATE_PATH", "card_data", "check_checkpoint", "check_hub_access", "publish", "render_card"]
