"""From captioned frames to readable cues: merge repeats, drop doubtful ones, fix durations.

Pure functions on typed values, no I/O and no model, so every rule is tested with
hand-written samples. :class:`Segment`, the cue every writer takes, lives here too.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from difflib import SequenceMatcher

# Neighbouring captions at least this similar show as one cue. Similarity is the share of
# the shorter caption's words that the other has in the same order, because beam search on
# near-identical frames tends to drop or add a phrase: "a man is standing on the beach" /
# "a man in a blue shirt is standing on the beach" is 1.0 and "a cat sitting on a couch" /
# "a cat laying on a couch" is 0.83, while "a black dog" / "a white dog" (0.67) stay apart.
MERGE_SIMILARITY = 0.8

Span = tuple[float, float]  # (start, end) in seconds


@dataclass(frozen=True)
class Segment:
    """One subtitle cue."""

    start: float  # seconds from the start of the video
    end: float  # seconds, > start
    text: str  # the caption shown
    score: float  # mean log-probability per token of the caption (<= 0; higher is more confident)
    confidence: float | None = None  # estimated probability the caption is acceptable (a calibrated model's)


@dataclass(frozen=True)
class CaptionedFrame:
    """A sampled frame with its best caption, and how it was sampled."""

    time: float  # stream time of the frame, seconds
    text: str  # best caption
    score: float  # its mean log-probability per token
    shot: int = 0  # index of the shot the frame belongs to (0 for everything without scene detection)
    shot_span: Span | None = None  # (start, end) of that shot; None when the frame was sampled uniformly
    confidence: float | None = None  # estimated probability the caption is acceptable (a calibrated model's)


@dataclass(frozen=True)
class Sample:
    """A captioned frame and the stretch of video it stands for."""

    start: float  # seconds
    end: float  # seconds
    text: str  # best caption of the frame
    score: float  # its mean log-probability per token
    shot: int = 0  # samples from different shots never merge (all 0 without scene detection)
    confidence: float | None = None  # the frame caption's confidence (a calibrated model's)


def frame_samples(frames: list[CaptionedFrame], video_end: float) -> list[Sample]:
    """The stretch of video each captioned frame stands for.

    A uniformly sampled frame stands for the video up to the next sampled frame (the last
    one: up to the end). Frames of one detected shot share it, split halfway between
    neighbours, so cues start and end at cuts. ``frames`` are in time order.
    """
    samples: list[Sample] = []
    groups = [list(g) for _, g in itertools.groupby(frames, key=lambda f: (f.shot, f.shot_span))]
    for i, group in enumerate(groups):
        following = groups[i + 1][0].time if i + 1 < len(groups) else video_end
        samples += _shot_samples(group, video_end) if group[0].shot_span else _uniform_samples(group, following)
    return samples


def _uniform_samples(frames: list[CaptionedFrame], following: float) -> list[Sample]:
    ends = [f.time for f in frames[1:]] + [max(following, frames[-1].time)]
    return [Sample(f.time, end, f.text, f.score, f.shot, f.confidence) for f, end in zip(frames, ends, strict=True)]


def _shot_samples(frames: list[CaptionedFrame], video_end: float) -> list[Sample]:
    start, end = frames[0].shot_span or (frames[0].time, video_end)
    times = [f.time for f in frames]
    bounds = [min(start, times[0])] + [(a + b) / 2 for a, b in itertools.pairwise(times)]
    bounds.append(max(min(end, video_end), times[-1]))
    return [Sample(bounds[i], bounds[i + 1], f.text, f.score, f.shot, f.confidence) for i, f in enumerate(frames)]


def word_similarity(a: str, b: str) -> float:
    """Share of the shorter caption's words found, in order, in the other (0..1; 1 for two empty captions)."""
    words_a, words_b = a.split(), b.split()
    if not words_a or not words_b:
        return float(words_a == words_b)
    blocks = SequenceMatcher(None, words_a, words_b, autojunk=False).get_matching_blocks()
    return sum(block.size for block in blocks) / min(len(words_a), len(words_b))


def merge_samples(samples: list[Sample], *, similarity: float = MERGE_SIMILARITY) -> list[Segment]:
    """One cue per run of consecutive samples of one shot whose captions are near-same.

    Each sample is compared with the one before it. A cue shows the caption of its best-scored
    sample, with that sample's score and confidence.
    """
    runs: list[list[Sample]] = []
    for sample in samples:
        previous = runs[-1][-1] if runs else None
        if previous and previous.shot == sample.shot and word_similarity(previous.text, sample.text) >= similarity:
            runs[-1].append(sample)
        else:
            runs.append([sample])
    cues = []
    for run in runs:
        best = max(run, key=lambda s: s.score)
        cues.append(Segment(run[0].start, run[-1].end, best.text, best.score, best.confidence))
    return cues


def split_long(segments: list[Segment], max_duration: float) -> list[Segment]:
    """Cues longer than ``max_duration`` cut into equal parts, each showing the same text."""
    result = []
    for segment in segments:
        parts = max(1, math.ceil((segment.end - segment.start) / max_duration - 1e-9))
        step = (segment.end - segment.start) / parts
        for i in range(parts):
            end = segment.end if i == parts - 1 else segment.start + (i + 1) * step
            result.append(replace(segment, start=segment.start + i * step, end=end))
    return result


def extend_short(segments: list[Segment], min_duration: float, video_end: float) -> list[Segment]:
    """Cues shorter than ``min_duration`` lengthened, never past the next cue's start or the video's end."""
    result = []
    for i, segment in enumerate(segments):
        limit = segments[i + 1].start if i + 1 < len(segments) else max(video_end, segment.end)
        end = max(segment.end, min(segment.start + min_duration, limit))
        result.append(replace(segment, end=end))
    return result


def shape_cues(
    segments: list[Segment],
    *,
    min_score: float | None,
    min_duration: float,
    max_duration: float,
    video_end: float,
) -> list[Segment]:
    """Enforce the duration limits, then drop empty and doubtful cues (score below ``min_score``).

    In that order, a dropped cue's stretch stays a gap: the cue before it is lengthened only up
    to where the dropped one began (unsure frames get no cue, not their neighbour's).
    """
    shaped = in_milliseconds(extend_short(split_long(segments, max_duration), min_duration, video_end))
    return [s for s in shaped if s.text.strip() and (min_score is None or s.score >= min_score)]


def in_milliseconds(segments: list[Segment]) -> list[Segment]:
    """Cue times as subtitle files hold them, in whole milliseconds, each cue at least one long
    and none starting before the one ahead of it ends.

    Frames a fraction of a millisecond apart would otherwise give a cue that ends where it
    starts (``00:00:00,000 --> 00:00:00,000``), which players skip or refuse; such cues move
    a millisecond later instead.
    """
    def rounded(seconds: float) -> float:
        return math.floor(seconds * 1000 + 0.5) / 1000  # halves up, where round() would go to even

    result: list[Segment] = []
    for s in segments:
        start = max(rounded(s.start), result[-1].end) if result else rounded(s.start)
        result.append(replace(s, start=start, end=max(rounded(s.end), rounded(start + 0.001))))
    return result
