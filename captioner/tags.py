"""Tags: the encoder's own ImageNet labels for a picture, the words asset libraries search on.

The classifier head already runs for the concept boost, so tags cost one small matrix
product. They say what the encoder sees in ImageNet's terms ("espresso", "tabby") even
where the caption, bound to its training vocabulary, cannot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # the CLI reads TAG_SEPARATOR before it decides to load torch (a refused flag never does)
    import torch

TAG_THRESHOLD = 0.1  # a label is a tag when the classifier gives it at least this probability
MAX_TAGS = 5
TAG_SEPARATOR = "; "  # between "label:p" parts where tags share one text field (a CSV cell)


def label_problem(label: str) -> str | None:
    """Why ``label`` cannot name a class whose tags every output can hold and read back (None: it can).

    ImageNet's labels all pass; a label from an edited export might not, and a CSV batch
    output holding it could then not be resumed.
    """
    if not label.strip():
        return "is empty"
    if TAG_SEPARATOR.strip() in label:
        return f"holds {TAG_SEPARATOR.strip()!r}, which separates tags in a CSV cell"
    if not label.isprintable():
        return "holds a control character"
    return None


@dataclass(frozen=True)
class Tag:
    """One ImageNet label with the classifier's probability for it."""

    label: str
    p: float


def top_tags(probs: torch.Tensor, class_names: tuple[str, ...], *, threshold: float = TAG_THRESHOLD,
             limit: int = MAX_TAGS) -> list[list[Tag]]:
    """(B, classes) probabilities -> per image, up to ``limit`` labels at or above ``threshold``, likeliest first."""
    values, indices = probs.float().topk(min(limit, probs.shape[1]), dim=1)
    return [[Tag(class_names[i], round(p, 4)) for p, i in zip(row_p.tolist(), row_i.tolist(), strict=True)
             if p >= threshold] for row_p, row_i in zip(values, indices, strict=True)]


def tag_description(tags: Sequence[Tag]) -> str | None:
    """A plain description from the likeliest tag ("a photo of an espresso"); None without tags.

    The honest fallback for a caption the model is unsure of: it says only what the
    classifier sees, in its own (ImageNet) words.
    """
    if not tags:
        return None
    label = tags[0].label
    article = "an" if label[:1].lower() in "aeiou" else "a"
    return f"a photo of {article} {label}"
