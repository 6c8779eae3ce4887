"""captioner: Show-and-Tell style image and video captioning.

The front doors are imported on first use (PEP 562), so that ``captioner --help`` and
other light entry points do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from captioner.errors import CaptionerError

_FRONT_DOORS = {
    "caption_images": "captioner.api",
    "caption_paths": "captioner.api",
    "evaluate": "captioner.api",
    "load_model": "captioner.api",
    "Caption": "captioner.decoding",
    "DecodingOptions": "captioner.options",  # torch-free: building options costs no torch import
}

__all__ = ["Caption", "CaptionerError", "DecodingOptions", "caption_images", "caption_paths", "evaluate", "load_model"]


def __getattr__(name: str) -> Any:
    if name not in _FRONT_DOORS:
        raise AttributeError(f"module 'captioner' has no attribute {name!r}")
    return getattr(importlib.import_module(_FRONT_DOORS[name]), name)
