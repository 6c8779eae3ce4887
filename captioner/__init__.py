"""captioner: Show-and-Tell style image and video captioning."""

from captioner.api import caption_images, caption_paths, evaluate, load_model
from captioner.decoding import Caption, DecodingOptions
from captioner.errors import CaptionerError

__all__ = ["Caption", "CaptionerError", "DecodingOptions", "caption_images", "caption_paths", "evaluate", "load_model"]
