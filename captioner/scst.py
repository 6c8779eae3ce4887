"""Self-critical sequence training (Rennie et al. 2017): optimize CIDEr-D directly.

After cross-entropy training, the model samples K captions per image; each sample's
reward is its CIDEr-D against that image's references, and its baseline is the mean
reward of the image's other K-1 samples (no greedy pass needed). The policy gradient
raises the probability of samples that beat their siblings. This is what moves CIDEr-D
most once teacher forcing has converged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from captioner.cider import CiderD
from captioner.decoder import CaptionDecoder
from captioner.vocab import END, Vocabulary


def sample_with_logprobs(
    decoder: CaptionDecoder, grid: torch.Tensor, vocab: Vocabulary, samples: int, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``samples`` captions per image with gradients.

    Returns token ids (B*K, T) (``<end>`` repeated after the end) and the log-probability
    of each emitted token (B*K, T), zero after ``<end>``.
    """
    state = decoder.start(grid, samples)
    n = grid.shape[0] * samples
    banned = torch.zeros(len(vocab), dtype=torch.bool, device=grid.device)
    banned[[vocab.pad, vocab.start, vocab.unk]] = True
    tokens = torch.full((n,), vocab.start, dtype=torch.long, device=grid.device)
    alive = torch.ones(n, dtype=torch.bool, device=grid.device)
    emitted, logprobs = [], []
    for _ in range(max_length):
        log_probs, state = decoder.step(tokens, state)
        log_probs = log_probs.masked_fill(banned, -math.inf)
        chosen = torch.multinomial(log_probs.detach().exp(), 1).squeeze(1)
        chosen = torch.where(alive, chosen, torch.full_like(chosen, vocab.end))
        logprobs.append(log_probs.gather(1, chosen[:, None]).squeeze(1) * alive)
        emitted.append(chosen)
        alive = alive & (chosen != vocab.end)
        tokens = chosen
        if not alive.any():
            break
    return torch.stack(emitted, dim=1), torch.stack(logprobs, dim=1)


def reward_tokens(words: list[str]) -> list[str]:
    """Words plus an end marker, for candidates and references alike.

    Without it, CIDEr-D cannot see how a caption ends, and self-critical training learns
    to stop mid-phrase ("a boy is playing on a"): n-grams like "on a <end>" never occur in
    references, so the marker makes such endings cost reward.
    """
    return [*words, END]


@dataclass
class PolicyTerms:
    """One batch's self-critical terms as sums, so that processes holding parts of a global
    batch add up to what one process holding all of it computes."""

    loss_sum: torch.Tensor  # -(advantage x log-probability), summed over the emitted tokens
    tokens: int  # emitted tokens, <end> included: the loss is loss_sum over all processes' tokens
    reward_sum: float  # the samples' CIDEr-D rewards, summed
    samples: int  # sampled captions


def self_critical_terms(
    decoder: CaptionDecoder,
    grid: torch.Tensor,
    image_ids: list[int],
    cider: CiderD,  # built on references passed through reward_tokens
    vocab: Vocabulary,
    *,
    samples: int = 5,
    max_length: int = 20,
) -> PolicyTerms:
    """Policy-gradient terms for one batch of images (the loss is ``loss_sum / tokens``)."""
    tokens, logprobs = sample_with_logprobs(decoder, grid, vocab, samples, max_length)
    rows = [reward_tokens(vocab.words(row)) for row in tokens.tolist()]
    rewards = torch.tensor(
        [cider.mean_scores(rows[b * samples : (b + 1) * samples], [image]) for b, image in enumerate(image_ids)],
        device=grid.device,
    )  # (B, K)
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (samples - 1)
    advantage = (rewards - baseline).view(-1, 1)  # (B*K, 1)
    first = torch.ones_like(tokens[:, :1], dtype=torch.bool)
    emitted = torch.cat([first, tokens[:, :-1] != vocab.end], dim=1)  # (B*K, T) up to and with <end>
    return PolicyTerms(-(advantage * logprobs * emitted).sum(), int(emitted.sum()), float(rewards.sum()),
                       rewards.numel())
