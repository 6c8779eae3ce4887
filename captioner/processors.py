"""Token rules applied to next-token log-probabilities before a search strategy sees them.

Each processor maps ``(log_probs (N, V), tokens (N, t))`` to new log-probs, where
``tokens`` is what each hypothesis has emitted so far. Forbidden tokens get ``-inf``.
Processors return a new tensor and never change ``log_probs`` in place: search keeps the
decoder's own log-probs beside the processed ones, and reports confidence from those.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


class LogitProcessor(Protocol):
    def __call__(self, log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor: ...


class SuppressTokens:
    """Never emit the given ids (``<unk>``, ``<pad>``, ``<start>``)."""

    def __init__(self, token_ids: list[int]):
        if any(i < 0 for i in token_ids):
            raise ValueError(f"token ids must be >= 0, got {token_ids}")
        self.token_ids = list(token_ids)

    def __call__(self, log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        log_probs = log_probs.clone()
        log_probs[:, self.token_ids] = -math.inf
        return log_probs


class MinLength:
    """Forbid ``<end>`` until ``min_length`` words have been emitted."""

    def __init__(self, min_length: int, end_id: int):
        if min_length < 0:
            raise ValueError(f"min_length must be >= 0, got {min_length}")
        self.min_length = min_length
        self.end_id = end_id

    def __call__(self, log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] >= self.min_length:
            return log_probs
        log_probs = log_probs.clone()
        log_probs[:, self.end_id] = -math.inf
        return log_probs


class NoRepeatNGram:
    """Forbid any token that would repeat an n-gram already in the hypothesis."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"no-repeat n-gram size must be >= 1, got {n}")
        self.n = n

    def __call__(self, log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One tensor program for all rows: every n-gram so far whose first n-1 tokens are the
        hypothesis's last n-1 bans its last token."""
        t = tokens.shape[1]
        if t < self.n:
            return log_probs  # no complete n-gram yet
        ngrams = tokens.unfold(1, self.n, 1)  # (N, t-n+1, n)
        prefix = tokens[:, t - self.n + 1 :]  # (N, n-1)
        repeats = (ngrams[:, :, :-1] == prefix[:, None, :]).all(dim=2)  # (N, t-n+1)
        hits = torch.zeros_like(log_probs).scatter_add_(1, ngrams[:, :, -1], repeats.to(log_probs.dtype))
        return log_probs.masked_fill(hits > 0, -math.inf)


class ConceptBoost:
    """Add a per-image bonus (N, V) to the log-probs of words not yet in the hypothesis.

    Rows of ``bias`` follow hypotheses; search only reorders hypotheses within an image,
    so a row's bias (its image's) stays right.
    """

    def __init__(self, bias: torch.Tensor):
        if bias.dim() != 2 or bool((bias < 0).any()):
            raise ValueError(f"concept bias must be a non-negative (N, V) tensor, got shape {tuple(bias.shape)}")
        self.bias = bias

    def __call__(self, log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if tokens.shape[1]:
            used = torch.zeros_like(bias, dtype=torch.bool).scatter_(1, tokens, True)
            bias = bias.masked_fill(used, 0.0)
        return log_probs + bias
