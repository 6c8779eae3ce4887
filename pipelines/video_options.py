"""Video options: the one place for every video default, with no heavy imports.

The CLI builds its ``video`` flags from these fields at start-up (``captioner --help``), so
this module imports neither torch, numpy nor OpenCV; the pipeline is in :mod:`.video`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from captioner.errors import OptionError
from captioner.options import Bounds, check_fields, option

# Names of the sampling modes; each has a sampler class in video.SAMPLERS (add a mode in both places).
SAMPLING_MODES = ("uniform", "scenes")


@dataclass(frozen=True)
class VideoOptions:
    """How frames are picked and cues shaped; change fields with ``dataclasses.replace``.

    Every field is checked when the options are made (type and bounds; an ``OptionError``
    names the field). The metadata (help, type, bounds, choices) is what the CLI's flags
    are generated from.
    """

    # how frames are picked: "uniform" (one every `every` seconds) or "scenes" (spread inside detected shots)
    mode: str = option("uniform", str, "how frames are picked: uniform (one every EVERY seconds) or scenes (spread "
                       "inside the shots PySceneDetect finds, in the same decoding pass; cues never cross a cut)",
                       choices=SAMPLING_MODES)
    # seconds between sampled frames; with "scenes", the density inside a shot
    every: float = option(2.0, float, "seconds between captioned frames (scenes: inside a shot)", Bounds(0.01, 3600))
    # frames captioned per shot at most, evenly spread ("scenes" only)
    max_per_scene: int = option(3, int, "frames captioned per shot at most, evenly spread (scenes mode)",
                                Bounds(1, 100))
    # drop cues whose score (mean log-probability per token, <= 0) is lower; None keeps every cue
    min_score: float | None = option(None, float, "drop cues whose score (mean log-probability per token) is "
                                     "lower, e.g. -2.5", Bounds(-100, 0))
    # drop cues whose caption's confidence (a calibrated model's) is lower; None keeps every cue
    min_confidence: float | None = option(None, float, "drop cues whose caption is less confident than this "
                                          "(estimated probability that it is acceptable; a calibrated model's, "
                                          "such as the default), e.g. 0.3", Bounds(0, 1))
    # seconds a cue lasts at least, if the next cue leaves room
    min_duration: float = option(1.0, float, "seconds a cue lasts at least, when the next one leaves room",
                                 Bounds(0, 60))
    # seconds a cue lasts at most; longer ones are split (>= min_duration)
    max_duration: float = option(7.0, float, "seconds a cue lasts at most; longer ones are split (>= min duration)",
                                 Bounds(0.5, 3600))
    # uniform sampling jumps over the frames between captioned ones (MP4/MOV, MKV/WebM); False reads every frame
    seek: bool = option(True, bool, "jump over the frames between captioned ones in MP4/MOV and MKV/WebM files "
                        "(uniform sampling); --no-seek decodes every frame, so that every damaged stretch is "
                        "found and reported")
    # frames per encoder + beam search batch
    batch_size: int = option(16, int, "frames captioned per batch", Bounds(1, 256))

    def with_given(self, given: Mapping[str, Any]) -> VideoOptions:
        """These options with the values a caller named; one the sampling mode would not read is refused.

        Raises:
            OptionError: a value out of range, or ``max_per_scene`` named for uniform sampling.
        """
        options = replace(self, **given)
        if "max_per_scene" in given and options.mode != "scenes":
            raise OptionError(f"video option max_per_scene applies to mode 'scenes' only, not '{options.mode}'")
        return options

    def __post_init__(self) -> None:
        check_fields(self, "video option")
        if self.max_duration < self.min_duration:
            raise OptionError(f"video option max_duration={self.max_duration!r} must be >= "
                              f"min_duration={self.min_duration!r}")
