"""Calibrated confidence: the estimated probability that a caption is acceptable.

A fluent caption can be confidently wrong on a photo unlike the training data, so the
model's own score alone is a weak guide. The calibrator is a logistic regression over
signals the model already computes: the caption's true token log-probabilities and
length, the encoder's ImageNet class distribution (entropy, top probability), how much of
that distribution the caption names and leaves unnamed (through the grounding map: "cat"
names tabby; "espresso" at 0.9 under "a dog runs through the water" is unnamed), and how far the image's
pooled feature lies from the training images' (a diagonal Mahalanobis distance to a few
KB of statistics), and how well the caption agrees with the human captions of the most
similar training photos (:mod:`captioner.consensus`). "Acceptable" means per-image CIDEr-D of at least
:data:`ACCEPTABLE_CIDER` against the image's references; ``tools/fit_calibrator.py`` fits
it on Flickr8k dev and part of coco_mini and writes it, as JSON, into the model folder.

The signs of six weights are fixed by what they mean (a likelier caption, one that names
what the classifier sees or agrees with similar photos' captions, and an image nearer the
training data are never less trustworthy), so confidence is monotone in those inputs whatever the fit finds; the fit
drops a signal whose weight would break that.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from captioner.decoding import Caption
from captioner.errors import ModelLoadError, OptionError, printable, reason, shortened
from captioner.finite import is_finite_number

CALIBRATION_FILE = "calibration.json"
ACCEPTABLE_CIDER = 0.5  # a caption is acceptable when its per-image CIDEr-D reaches this

# Signal names in the order of their columns; the sign each weight must keep (0: free).
SIGNALS = ("mean_logprob", "min_logprob", "words", "class_entropy", "top_class_p", "feature_distance",
           "named_class_p", "unnamed_class_p", "consensus")
SIGNS = {"mean_logprob": 1, "min_logprob": 1, "words": 0, "class_entropy": 0, "top_class_p": 0,
         "feature_distance": -1, "named_class_p": 1, "unnamed_class_p": -1, "consensus": 1}
NAMED_CLASSES = 5  # the likeliest classes whose naming by the caption is checked
MIN_PROB = 1e-12  # floor before taking the log of a caption's least likely token
MAX_SHARE = 1e3  # the most one signal adds to or takes from the logit (sigmoid(37) is already 1 in float64)


def check_min_confidence(min_confidence: float | None, model) -> None:
    """Refuse a confidence threshold for a model that gives no confidence, before any work.

    Raises:
        OptionError: ``min_confidence`` is outside [0, 1], or the model has no calibrator.
    """
    if min_confidence is None:
        return
    if not isinstance(min_confidence, numbers.Real) or isinstance(min_confidence, bool) or not 0 <= min_confidence <= 1:
        raise OptionError(f"min_confidence={min_confidence!r} must be a number in [0, 1]")
    if getattr(model, "calibrator", None) is None:
        raise OptionError(f"min_confidence needs a calibrated model (a {CALIBRATION_FILE} in its folder); "
                          "this one gives no confidence (see tools/fit_calibrator.py)")


@dataclass(frozen=True)
class FeatureStats:
    """Per-channel mean and standard deviation of the training images' pooled encoder features."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, pooled: torch.Tensor) -> "FeatureStats":
        """Statistics of (N, C) pooled features."""
        pooled = pooled.double()
        return cls(_rounded(pooled.mean(dim=0)), _rounded(pooled.std(dim=0).clamp_min(1e-6)))

    def distance(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) pooled features -> (B,) root mean square of their standardized deviations."""
        mean = torch.tensor(self.mean, dtype=torch.float64)
        std = torch.tensor(self.std, dtype=torch.float64)
        return ((pooled.double().cpu() - mean) / std).square().mean(dim=1).sqrt()


def _rounded(values: torch.Tensor) -> tuple[float, ...]:
    """Six significant digits: the statistics stay a few KB of JSON and lose nothing that matters."""
    return tuple(float(f"{v:.6g}") for v in values.tolist())


def image_signals(pooled: torch.Tensor, probs: torch.Tensor | None, stats: FeatureStats) -> torch.Tensor:
    """(B, C) pooled grid and (B, classes) class probabilities -> (B, 3): entropy, top probability, distance.

    An encoder without a classifier head gives the uninformative values (entropy of a uniform
    distribution over one class: 0, top probability 1), which a calibrator fitted on such a
    model would learn to ignore.
    """
    distance = stats.distance(pooled)
    if probs is None:
        return torch.stack([torch.zeros_like(distance), torch.ones_like(distance), distance], dim=1)
    p = probs.double().cpu()
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=1)
    return torch.stack([entropy, p.max(dim=1).values, distance], dim=1)


def caption_signals(caption: Caption) -> list[float]:
    """Mean and minimum token log-probability and word count of one caption."""
    return [caption.score, math.log(max(caption.min_prob, MIN_PROB)), float(len(caption.tokens))]


def class_naming(word_ids: list[int], probs: torch.Tensor | None, concepts: torch.Tensor) -> list[float]:
    """Probability mass of the likeliest nameable classes that the caption names, and that it does not.

    A class is nameable when some vocabulary word grounds it, and named when the caption uses one.

    Args:
        word_ids: the caption's word ids.
        probs: (classes,) the image's class probabilities (None: no classifier, nothing unnamed).
        concepts: (classes, V) 0/1 grounding matrix (:func:`captioner.concepts.concept_matrix`).
    """
    if probs is None:
        return [0.0, 0.0]
    p, classes = probs.detach().float().cpu().topk(NAMED_CLASSES)
    words = concepts.cpu()[classes]  # (k, V)
    nameable = words.sum(dim=1) > 0
    named = words[:, word_ids].sum(dim=1) > 0 if word_ids else torch.zeros_like(nameable)
    return [float((p * (nameable & named)).sum()), float((p * (nameable & ~named)).sum())]


def signal_rows(captions: Sequence[Sequence[Caption]], images: torch.Tensor, probs: torch.Tensor | None,
                concepts: torch.Tensor, word_ids: Callable[[Sequence[str]], list[int]],
                consensus: Sequence[Sequence[float]]) -> list[torch.Tensor]:
    """Per image, (n-best, len(SIGNALS)) signals of its captions.

    Args:
        images: (B, 3) from :func:`image_signals`.
        probs: (B, classes) class probabilities, or None.
        concepts: the grounding matrix; ``word_ids`` maps a caption's tokens to vocabulary ids.
        consensus: each caption's agreement with its neighbours' references (:mod:`captioner.consensus`).
    """
    rows = []
    for i, n_best in enumerate(captions):
        image = images[i].tolist()
        p = None if probs is None else probs[i]
        rows.append(torch.tensor([caption_signals(c) + image + class_naming(word_ids(c.tokens), p, concepts) + [agree]
                                  for c, agree in zip(n_best, consensus[i], strict=True)],
                                 dtype=torch.float64).reshape(len(n_best), len(SIGNALS)))
    return rows


@dataclass(frozen=True)
class Calibrator:
    """Logistic regression on standardized signals; ``confidence`` is its probability of acceptable."""

    center: tuple[float, ...]  # per-signal mean on the fitting set
    scale: tuple[float, ...]  # per-signal standard deviation on the fitting set
    weights: tuple[float, ...]  # per standardized signal
    bias: float
    features: FeatureStats  # the training images' pooled-feature statistics, for feature_distance
    acceptable: str = f"per-image CIDEr-D >= {ACCEPTABLE_CIDER}"  # what the probability is of
    signals: tuple[str, ...] = SIGNALS

    def confidence(self, signals: torch.Tensor) -> torch.Tensor:
        """(N, len(SIGNALS)) raw signals -> (N,) probabilities in [0, 1].

        Each signal's share of the logit is bounded by :data:`MAX_SHARE`, so that a calibrator
        of finite but extreme numbers (weights near 1e308, a scale near 1e-300) cannot add
        two opposite infinities into NaN, a confidence every threshold would let through.
        A share that large already decides the probability; bounding keeps confidence
        monotone in each signal.
        """
        z = (signals.double() - torch.tensor(self.center)) / torch.tensor(self.scale)
        weights = torch.tensor(self.weights, dtype=torch.float64)
        shares = torch.where(weights == 0, 0.0, z * weights).clamp(-MAX_SHARE, MAX_SHARE)
        return torch.sigmoid(shares.sum(dim=1) + self.bias)

    @classmethod
    def fit(cls, signals: torch.Tensor, acceptable: torch.Tensor, features: FeatureStats, *,
            l2: float = 1.0) -> "Calibrator":
        """Fit on (N, len(SIGNALS)) signals and (N,) 0/1 labels, keeping the weights' fixed signs.

        A signal whose weight comes out with the wrong sign is dropped (weight 0) and the rest
        refitted, until every kept weight has its sign.
        """
        x = signals.double()
        center, scale = x.mean(dim=0), x.std(dim=0).clamp_min(1e-9)
        z = (x - center) / scale
        y = acceptable.double()
        kept = list(range(len(SIGNALS)))
        while True:
            weights, bias = logistic_regression(z[:, kept], y, l2)
            wrong = [k for k, w in zip(kept, weights.tolist(), strict=True) if SIGNS[SIGNALS[k]] * w < 0]
            if not wrong:
                break
            kept.remove(wrong[0])
        full = torch.zeros(len(SIGNALS), dtype=torch.float64)
        full[kept] = weights
        return cls(tuple(center.tolist()), tuple(scale.tolist()), tuple(full.tolist()), float(bias), features)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, channels: int) -> "Calibrator":
        """Read a calibration.json written by :meth:`save`, checking every number.

        Raises:
            ModelLoadError: ``FILE: bad calibration: reason``.
        """
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            calibrator = _from_dict(raw)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError,
                ValueError, OverflowError) as e:
            raise ModelLoadError(f"{printable(path)}: bad calibration: {_reason(e)}") from e
        if len(calibrator.features.mean) != channels:
            raise ModelLoadError(f"{printable(path)}: bad calibration: feature statistics have "
                                 f"{len(calibrator.features.mean)} channels, the encoder {channels}")
        return calibrator


def logistic_regression(z: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, float]:
    """Newton's method on the L2-penalized (bias unpenalized) log-loss; (weights, bias)."""
    x = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
    penalty = torch.full((x.shape[1],), l2, dtype=z.dtype)
    penalty[-1] = 0.0
    theta = torch.zeros(x.shape[1], dtype=z.dtype)
    for _ in range(100):
        p = torch.sigmoid(x @ theta)
        gradient = x.T @ (p - y) + penalty * theta
        hessian = (x.T * (p * (1 - p))) @ x + torch.diag(penalty) + 1e-9 * torch.eye(x.shape[1], dtype=z.dtype)
        step = torch.linalg.solve(hessian, gradient)
        theta = theta - step
        if step.abs().max() < 1e-10:
            break
    return theta[:-1], float(theta[-1])


def _from_dict(raw: dict) -> Calibrator:
    if not isinstance(raw, dict):
        raise TypeError("not a JSON object")
    if raw["signals"] != list(SIGNALS):
        raise ValueError(f"signals {shortened(repr(raw['signals']), 80)} are not {list(SIGNALS)!r}")
    n = len(SIGNALS)
    center, scale, weights = (_numbers(raw, name, n) for name in ("center", "scale", "weights"))
    if min(scale) <= 0:
        raise ValueError("scale must be positive")
    features = raw["features"]
    if not isinstance(features, dict):
        raise ValueError('features must be an object with "mean" and "std"')
    mean = _numbers(features, "mean", None)
    std = _numbers(features, "std", len(mean))
    if min(std) <= 0:
        raise ValueError("feature std must be positive")
    if not isinstance(raw["acceptable"], str):
        raise ValueError("acceptable must be text saying what the probability is of")
    return Calibrator(center, scale, weights, _numbers({"bias": [raw["bias"]]}, "bias", 1)[0],
                      FeatureStats(mean, std), raw["acceptable"])


def _numbers(raw: dict, name: str, length: int | None) -> tuple[float, ...]:
    values = raw[name]
    if not isinstance(values, list) or not values or (length is not None and len(values) != length):
        raise ValueError(f"{name} must be a list of {length or 'some'} numbers")
    if not all(is_finite_number(v) for v in values):
        raise ValueError(f"{name} holds a value that is not a finite number")
    return tuple(float(v) for v in values)


def _reason(error: BaseException) -> str:
    return f"missing field {error.args[0]!r}" if isinstance(error, KeyError) else reason(error)
