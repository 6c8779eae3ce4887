"""Regularizers for teacher-forced training on cached grids.

The decoder memorizes its training captions (train CIDEr-D about 1.2 against 0.5 on dev),
and self-critical training on those same images only deepens that. Both helpers here
make a training caption harder to recite from memory:

- word dropout (Bowman et al. 2016): some previous words the decoder is fed become
  ``<unk>``, so the next word has to come from the image more than from the phrase so far;
- a random resized crop of the feature grid: a cheap stand-in for cropping the photo,
  since cached grids are computed once and the CNN never sees the crop (when the CNN is
  fine-tuned, its output grid is cropped the same way).

The teacher of word-level distillation still reads the real previous words: its
next-word distribution is the target, and hiding words from it would blur that target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def drop_words(inputs: torch.Tensor, rate: float, *, unk: int, pad: int) -> torch.Tensor:
    """Input tokens (B, T) with each word after the first position replaced by ``unk`` with probability ``rate``.

    Position 0 (``<start>``) and padding stay: the decoder still knows where a caption begins
    and ends.
    """
    if rate == 0:
        return inputs
    dropped = torch.rand(inputs.shape, device=inputs.device) < rate
    dropped[:, 0] = False
    dropped &= inputs != pad
    return inputs.masked_fill(dropped, unk)


def crop_grids(grids: torch.Tensor, min_side: float) -> torch.Tensor:
    """Grids (B, C, h, w), each replaced by a random square-ish crop resized back to (h, w).

    Each crop keeps a share of the side drawn uniformly from [min_side, 1] at a uniform
    position; bilinear sampling resizes it. ``min_side`` 1 returns the grids unchanged.
    """
    if min_side >= 1:
        return grids
    batch = grids.shape[0]
    side = torch.empty(batch, device=grids.device).uniform_(min_side, 1.0)  # (B,) share of the side kept
    shift = (torch.rand(batch, 2, device=grids.device) * 2 - 1) * (1 - side)[:, None]  # (B, 2) centre offset
    theta = torch.zeros(batch, 2, 3, device=grids.device, dtype=grids.dtype)
    theta[:, 0, 0] = side
    theta[:, 1, 1] = side
    theta[:, :, 2] = shift
    where = F.affine_grid(theta, list(grids.shape), align_corners=False)  # (B, h, w, 2) in [-1, 1]
    return F.grid_sample(grids, where, mode="bilinear", padding_mode="border", align_corners=False)
