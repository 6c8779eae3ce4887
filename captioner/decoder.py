"""LSTM caption decoder whose initial hidden and cell state come from the image feature.

This is the Show-and-Tell design: the pooled CNN feature, projected, *initializes* the
LSTM. With ``attention=True`` each step also attends over the encoder's grid cells
(Show-Attend-Tell soft attention, with its gating scalar), which scores higher; the plain
vector-initialized LSTM stays available as ``attention=False``.

The decoder exposes ``start``/``step`` so that search strategies can drive it one token
at a time. Its state is a tuple of tensors of two kinds, told apart by their first
dimension: per hypothesis (``B * width`` rows: the LSTM's h and c) and per image (``B``
rows: the attention's projected grid cells, identical for all of an image's hypotheses).
Keeping the latter per image spares search from copying them for every hypothesis at
every step, and lets attention run as one batched product per image.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from captioner.options import DecoderConfig

DecoderState = tuple[torch.Tensor, ...]

class CaptionDecoder(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=0)
        self.init_h = nn.Linear(c.feature_dim, c.hidden_dim)
        self.init_c = nn.Linear(c.feature_dim, c.hidden_dim)
        self.dropout = nn.Dropout(c.dropout)
        input_dim = c.embed_dim
        if c.attention:
            # Cells are projected to hidden_dim once per image; attention reads the projection.
            self.att_value = nn.Linear(c.feature_dim, c.hidden_dim)
            self.att_key = nn.Linear(c.hidden_dim, c.attention_dim)
            self.att_hidden = nn.Linear(c.hidden_dim, c.attention_dim)
            self.att_score = nn.Linear(c.attention_dim, 1)
            self.att_gate = nn.Linear(c.hidden_dim, c.hidden_dim)
            input_dim += c.hidden_dim
        self.lstm = nn.LSTMCell(input_dim, c.hidden_dim)
        self.out = nn.Linear(c.hidden_dim, c.vocab_size)

    def start(self, grid: torch.Tensor, width: int = 1) -> DecoderState:
        """(B, C, h, w) encoder grid -> initial state of ``width`` hypotheses per image.

        h0 and c0 are projections of the pooled feature (B * width rows, an image's rows
        consecutive); the attention's values and keys stay per image (B rows).
        """
        cells = grid.flatten(2).transpose(1, 2).float()  # (B, L, C)
        pooled = cells.mean(dim=1)  # (B, C)
        h = torch.tanh(self.init_h(pooled)).repeat_interleave(width, dim=0)  # (B*W, H)
        c = torch.tanh(self.init_c(pooled)).repeat_interleave(width, dim=0)  # (B*W, H)
        if not self.config.attention:
            return (h, c)
        values = self.att_value(cells)  # (B, L, H)
        return (h, c, values, self.att_key(values))  # keys (B, L, A)

    def _attend(self, h: torch.Tensor, values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Gated soft-attention context (N, H) for hidden states h (N, H) of N = B * W hypotheses.

        values (B, L, H) and keys (B, L, A) are per image; each image's W consecutive rows of
        h attend over its cells in one batched product.
        """
        images, cells = keys.shape[0], keys.shape[1]
        width = h.shape[0] // images
        query = self.att_hidden(h).view(images, width, 1, -1)  # (B, W, 1, A)
        energy = self.att_score(torch.tanh(keys[:, None] + query)).view(images, width, cells)  # (B, W, L)
        context = torch.bmm(energy.softmax(dim=2), values).view(h.shape[0], -1)  # (N, H)
        return torch.sigmoid(self.att_gate(h)) * context

    def _advance(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        """One LSTM step; returns output logits (N, V) and the new state."""
        h, c = state[0], state[1]
        x = self.dropout(self.embed(tokens))  # (N, E)
        if self.config.attention:
            x = torch.cat([x, self._attend(h, state[2], state[3])], dim=1)
        h, c = self.lstm(x, (h, c))
        return self.out(self.dropout(h)), (h, c, *state[2:])

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        """Previous tokens (N,) -> next-token log-probabilities (N, V) and the new state."""
        logits, state = self._advance(tokens, state)
        return logits.float().log_softmax(dim=-1), state

    def forward(self, grid: torch.Tensor, inputs: torch.Tensor, sample_rate: float = 0.0,
                never_drawn: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: grid (B, C, h, w), input tokens (B, T) -> logits (B, T, V).

        With ``sample_rate`` > 0 (scheduled sampling, Bengio et al. 2015), each input after
        the first is, with that probability per caption, a word drawn from the decoder's own
        previous distribution instead of the reference's: training then sees the kind of
        prefixes that search feeds it. ``never_drawn`` holds token ids the draw excludes
        (padding, <start>, <end>). No gradient flows through the draw.
        """
        state = self.start(grid)
        logits = []
        for t in range(inputs.shape[1]):
            tokens = inputs[:, t]
            if t and sample_rate > 0:
                previous = logits[-1].detach().float()
                if never_drawn is not None:
                    previous = previous.index_fill(1, never_drawn, -math.inf)
                drawn = torch.multinomial(previous.softmax(dim=-1), 1).squeeze(1)
                tokens = torch.where(torch.rand(tokens.shape, device=tokens.device) < sample_rate, drawn, tokens)
            step_logits, state = self._advance(tokens, state)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)


class EnsembleDecoder(nn.Module):
    """Several decoders trained alike from different seeds, searched as one.

    Members overfit Flickr8k-sized data in different ways, so averaging their next-word
    distributions (arithmetic mean of probabilities) scores higher than any one of them.
    The ensemble's state is the members' states laid end to end, so search reorders it
    like any other state.
    """

    def __init__(self, config: DecoderConfig, size: int):
        super().__init__()
        if size < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {size}")
        self.config = config
        self.members = nn.ModuleList(CaptionDecoder(config) for _ in range(size))

    def start(self, grid: torch.Tensor, width: int = 1) -> DecoderState:
        return tuple(s for member in self.members for s in member.start(grid, width))

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        size = len(self.members)
        k = len(state) // size  # tensors per member state: members are alike, so they hold equal shares
        log_probs, states = [], []
        for i, member in enumerate(self.members):
            member_log_probs, member_state = member.step(tokens, state[i * k : (i + 1) * k])
            log_probs.append(member_log_probs)
            states.extend(member_state)
        return _mean_distribution(log_probs), tuple(states)

    def forward(self, grid: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: (B, T, V) log-probabilities of the members' mean distribution.

        They serve as logits: their softmax is that distribution, as a single decoder's logits'
        softmax is its own (what word-level distillation from an ensemble needs).
        """
        return _mean_distribution([member(grid, inputs).float().log_softmax(dim=-1) for member in self.members])


def _mean_distribution(log_probs: list[torch.Tensor]) -> torch.Tensor:
    """Log of the arithmetic mean of the distributions whose log-probabilities are given."""
    return torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))


def build_decoder(config: DecoderConfig, members: int = 1) -> CaptionDecoder | EnsembleDecoder:
    return CaptionDecoder(config) if members == 1 else EnsembleDecoder(config, members)
