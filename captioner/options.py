"""Options dataclasses and their checks, with no heavy imports.

Each user-facing field is made with :func:`option`, whose metadata (help, type, bounds,
choices) both checks the value when the options are built and lets the CLI generate the
field's flag (:mod:`captioner.pipelines.flags`), so an option is listed in one place.
This module imports neither torch nor numpy: ``captioner --help`` builds every flag from
it in a fraction of a second.
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from captioner.errors import OptionError
from captioner.finite import is_finite_number

METHODS = ("beam", "greedy", "sample")
# The options of method "sample" alone, and the value that leaves each off (required of the other methods).
SAMPLING_ONLY = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": None}
# Options that only some methods read: set by name for another method, they would be ignored without a word.
METHOD_ONLY = {"beam_size": ("beam",), **{name: ("sample",) for name in SAMPLING_ONLY}}
# Options that rank an image's candidate captions: they need more than one (see DecodingOptions.candidates).
RANKING = ("length_penalty", "consensus_weight")


# The model shipped inside the package (a folder of config.json, vocab.json, model.safetensors, ...).
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


# Image-reading worker processes. On two cores, workers take the cores the encoder's two
# threads need: the folder pipeline ran at 58 img/s with none against 41 with two
# (benchmarks/bench_pipeline.py, Flickr8k photos), so only larger machines get them.
DEFAULT_WORKERS = 0 if (os.cpu_count() or 1) <= 2 else 2


@dataclass(frozen=True)
class Bounds:
    """An allowed interval, closed unless said open; prints as in messages ("(0, 1]")."""

    low: float
    high: float
    open_low: bool = False  # True: ``low`` itself is not allowed
    open_high: bool = False  # True: ``high`` itself is not allowed

    def __contains__(self, value: float) -> bool:
        above = self.low < value if self.open_low else self.low <= value
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"


def check_device(name: str, label: str, *, available: bool = True) -> None:
    """``name`` is a torch device captioner runs on (cpu or cuda); with ``available``, one this machine has.

    torch is imported here, not at module level: options must stay cheap to import.

    Raises:
        OptionError: ``LABEL='NAME': reason``.
    """
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionError(f"{label}={name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"{label}={name!r}: captioner runs on cpu or cuda")
    if available and device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"{label}={name!r}: CUDA is not available here; use cpu")


def check_path(value: object, label: str) -> None:
    """``value`` is one path (a str or an os.PathLike), as the Python front doors take them.

    Raises:
        OptionError: ``LABEL must be ...`` naming what was given instead (a list, bytes, None).
    """
    if isinstance(value, bytes):
        raise OptionError(f"{label} must be a path as str or os.PathLike, not bytes (os.fsdecode turns bytes into one)")
    if not isinstance(value, (str, os.PathLike)):
        raise OptionError(f"{label} must be one path (str or os.PathLike), not {type(value).__name__}")


def check_flag(value: object, label: str) -> None:
    """``value`` is True or False: the front doors' on/off arguments, where "no" would count as true.

    Raises:
        OptionError: ``LABEL=VALUE must be True or False``.
    """
    if not isinstance(value, bool):
        raise OptionError(f"{label}={value!r} must be True or False")


REQUIRED: Any = MISSING  # the default of an option that has none: it must be given


def option(default: Any, kind: type, help: str, bounds: Bounds | None = None, **extra: Any) -> Any:
    """A checked field whose metadata says what a CLI flag needs: help, type, bounds (and choices)."""
    metadata = {"help": help, "type": kind, **extra}
    if bounds is not None:
        metadata["bounds"] = bounds
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class DecodingOptions:
    """How captions are searched; change fields with ``dataclasses.replace``.

    Every field is checked when the options are made (type and bounds; an ``OptionError``
    names the field). Field metadata carries ``help``, ``type``, ``bounds`` and, for
    ``method``, ``choices``: the CLI builds its decoding flags from them.
    """

    # "beam", "greedy" or "sample"
    method: str = option("beam", str, "search method", choices=METHODS)
    # live hypotheses per image (beam only); memory grows with it
    beam_size: int = option(3, int, "hypotheses kept per image (beam search)", Bounds(1, 64))
    # tokens at most, counting <end>
    max_length: int = option(20, int, "most tokens per caption, counting the end token", Bounds(1, 100))
    # words at least before <end> may be emitted (< max_length)
    min_length: int = option(0, int, "fewest words before the caption may end", Bounds(0, 99))
    # alpha: rank by sum log-prob / length**alpha
    length_penalty: float = option(
        0.0, float, "alpha: rank n-best captions by search log-prob sum / length**alpha (0: sum, 1: mean); "
        "the reported score is always the model's own mean log-prob per token", Bounds(0, 10))
    # forbid repeating n-grams of this size (0: off)
    no_repeat_ngram: int = option(0, int, "never repeat an n-gram of this size (0: off)", Bounds(0, 10))
    # never emit <unk>
    suppress_unk: bool = option(True, bool, "never emit the unknown-word token")
    # hypotheses returned per image (<= beam_size; samples drawn for "sample"; 1 for greedy)
    n_best: int = option(1, int, "captions returned per image (beam: at most beam-size; sample: samples drawn; "
                          "greedy: 1)", Bounds(1, 64))
    # sampling temperature
    temperature: float = option(1.0, float, "sampling temperature", Bounds(0, 100, open_low=True))
    # sample among the k most likely tokens (0: all)
    top_k: int = option(0, int, "sample among the k most likely words (0: all)", Bounds(0, 100_000))
    # nucleus sampling mass (1.0: off)
    top_p: float = option(1.0, float, "sample from the smallest set holding this probability (1: off)",
                           Bounds(0, 1, open_low=True))
    # sampling seed, for reproducible samples (None: random)
    seed: int | None = option(None, int, "sampling seed, for reproducible samples: the same seed gives an image the "
                              "same samples whatever else is in its batch", Bounds(0, 2**64 - 1))
    # log-prob bonus per unit of classifier evidence for a word (0: off)
    concept_boost: float = option(0.0, float, "log-prob bonus for words the encoder's classifier sees (0: off)",
                                   Bounds(0, 50))
    # classifier evidence a word needs before it is boosted
    concept_threshold: float = option(0.5, float, "classifier evidence a word needs to be boosted",
                                       Bounds(0, 1, open_low=True))
    # rerank candidates by the search's ranking key + this weight x consensus CIDEr-D (0: off)
    consensus_weight: float = option(0.0, float, "rerank the beam's captions by the search's own ranking key (length "
                                     "penalty and concept boost included) plus this weight times their CIDEr-D "
                                     "against the nearest training photos' captions "
                                     "(0: off; refused for a model without consensus data)",
                                     Bounds(0, 50))

    def __post_init__(self) -> None:
        check_fields(self, "decoding option")
        if self.min_length >= self.max_length:
            raise OptionError(f"decoding option min_length={self.min_length} must be < max_length={self.max_length}")
        if self.method == "beam" and self.n_best > self.beam_size:
            raise OptionError(f"decoding option n_best={self.n_best} must be <= beam_size={self.beam_size}")
        if self.method == "greedy" and self.n_best != 1:
            raise OptionError(f"decoding option n_best={self.n_best} must be 1 with method 'greedy'")
        if self.method != "sample":  # set for another method, they would be ignored without a word
            for name, off in SAMPLING_ONLY.items():
                if getattr(self, name) != off:
                    raise OptionError(f"decoding option {name}={getattr(self, name)} applies to method 'sample' "
                                      f"only, not '{self.method}'")

    @property
    def candidates(self) -> int:
        """Captions searched per image, among which the ranking options choose."""
        return self.beam_size if self.method == "beam" else self.n_best if self.method == "sample" else 1

    def with_given(self, given: Mapping[str, Any]) -> "DecodingOptions":
        """These options (a model's tuned defaults) with the values a caller named, checked as a whole.

        A named option that the resulting search would not read is refused, as is a concept
        threshold with no concept boost to apply it. A model's defaults carry a beam size
        whatever the method, so the values alone cannot tell ``--method greedy --beam-size 4``
        (a beam size dropped without a word) from ``--method greedy``.
        An option the caller did not name and the new method does not read goes back to its
        plain default, so that a model that samples by default can be asked for beam search
        without unsetting its temperature first.

        Raises:
            OptionError: a value out of range, a rule across fields broken, or a named option unread.
        """
        changes = dict(given)
        method = changes.get("method", self.method)
        for f in fields(self):
            if f.name in METHOD_ONLY and f.name not in changes and method not in METHOD_ONLY[f.name]:
                changes[f.name] = f.default
        options = replace(self, **changes)
        for name in given:
            methods = METHOD_ONLY.get(name, METHODS)
            if options.method not in methods:
                which = " or ".join(f"'{m}'" for m in methods)
                raise OptionError(f"decoding option {name} applies to method {which} only, not '{options.method}'")
            if name == "concept_threshold" and options.concept_boost == 0:
                raise OptionError("decoding option concept_threshold picks the labels whose words concept_boost "
                                  "raises; concept_boost is 0")
            if name in RANKING and options.candidates == 1:
                one = {"greedy": "method 'greedy' finds one", "sample": "method 'sample' with n_best=1 draws one",
                       "beam": "method 'beam' with beam_size=1 keeps one"}[options.method]
                raise OptionError(f"decoding option {name} ranks an image's candidate captions; {one}")
        return options

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "DecodingOptions":
        """Options from a parsed JSON object (a model's config.json "decoding"); missing keys keep defaults.

        Raises:
            OptionError: ``raw`` is not an object, has unknown keys, or a value of the wrong type or range.
        """
        if not isinstance(raw, Mapping):
            raise OptionError(f"decoding options must be an object of option names, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in raw if k not in known)
        if unknown:
            raise OptionError(f"unknown decoding option(s): {', '.join(unknown)}")
        return cls(**raw)


def check_fields(options: Any, label: str = "") -> None:
    """Check and normalize every :func:`option` field of a frozen dataclass (others are left alone).

    Values reach options from JSON files, keyword arguments and flags, where ``"512"`` can
    stand for 512, ``"false"`` for False and NaN for a rate; Python would accept most of them
    and fail much later (or never). The message names the field, the value and what is allowed.

    Raises:
        OptionError: ``LABEL NAME=VALUE must be ...``.
    """
    for f in fields(options):
        if "type" in f.metadata:
            name = f"{label} {f.name}".strip()
            object.__setattr__(options, f.name, _checked(name, getattr(options, f.name), f.metadata, f.default))


def _checked(name: str, value: Any, metadata: Mapping[str, Any], default: Any) -> Any:
    """``value`` normalized to the field's type (3 -> 3.0 for a float), or an OptionError naming the field."""
    kind, bounds, choices = metadata["type"], metadata.get("bounds"), metadata.get("choices")
    given = value
    if value is None and default is None:
        return None
    if kind is bool:
        ok, rule = isinstance(value, bool), "true or false"
    elif kind is int:
        ok, rule = isinstance(value, numbers.Integral) and not isinstance(value, bool), "a whole number"
    elif kind is float:
        ok = is_finite_number(value)
        rule = "a number"
    elif choices is not None:
        ok, rule = isinstance(value, str) and value in choices, f"one of {', '.join(sorted(choices))}"
    else:
        ok, rule = isinstance(value, str) and bool(value.strip()), "a non-empty string"
    if bounds is not None:
        rule += f" in {bounds}"
        if ok:
            value = kind(value)
            ok = value in bounds
    if default is None:
        rule += " or None"
    if not ok:
        raise OptionError(f"{name}={given!r} must be {rule}")
    return value


MIN_VOCAB = 5  # the four special tokens and at least one word
MAX_VOCAB = 1_000_000  # far above any caption corpus; bounds the output layer
MAX_DIM = 8192  # bounds each layer: an LSTM of this size already holds about 3 GB of float32 weights


@dataclass(frozen=True)
class DecoderConfig:
    """Shape and regularization of the decoder (saved with the model)."""

    # output words, including the four special tokens
    vocab_size: int = option(REQUIRED, int, "output words, special tokens included", Bounds(MIN_VOCAB, MAX_VOCAB))
    # channels of the encoder grid
    feature_dim: int = option(REQUIRED, int, "channels of the encoder grid", Bounds(1, MAX_DIM))
    # word embedding size
    embed_dim: int = option(512, int, "word embedding size", Bounds(1, MAX_DIM))
    # LSTM hidden and cell size
    hidden_dim: int = option(512, int, "LSTM hidden and cell size", Bounds(1, MAX_DIM))
    # attend over grid cells at every step
    attention: bool = option(True, bool, "attend over the grid cells at every step")
    # size of the additive attention's hidden layer
    attention_dim: int = option(512, int, "size of the attention's hidden layer", Bounds(1, MAX_DIM))
    # dropout on embeddings and before the output layer
    dropout: float = option(0.5, float, "dropout on embeddings and before the output layer",
                            Bounds(0, 1, open_high=True))

    def __post_init__(self) -> None:
        """Refuse wrong types and sizes before any weight is allocated (a config comes from JSON)."""
        check_fields(self, "decoder option")


def declared_decoding(folder: str | os.PathLike) -> DecodingOptions | None:
    """The decoding defaults a model folder (``config.json``) or an ONNX export (``runtime.json``)
    declares, read from that JSON alone, without torch: so flags can be checked against the
    defaults they will change before the model loads. None where they cannot be read; loading
    the model then says why.
    """
    for name in ("config.json", "runtime.json"):
        try:
            raw = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
            if not isinstance(raw, dict):  # loading the model says what is wrong with it
                return None
            return DecodingOptions.from_dict(raw.get("decoding", {}))  # none: the plain defaults, as loading reads it
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):  # OptionError too
            return None
    return None
