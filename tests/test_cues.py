"""Cue shaping: the stretch each frame stands for, merging near-same captions, score filtering, durations."""

import pytest

from captioner.pipelines.cues import (
    CaptionedFrame,
    Sample,
    Segment,
    frame_samples,
    merge_samples,
    shape_cues,
    split_long,
    word_similarity,
)


def samples(*texts, every=2.0, shots=None):
    shots = shots or [0] * len(texts)
    return [Sample(i * every, (i + 1) * every, text, -1.0 - i / 10, shot) for i, (text, shot) in
            enumerate(zip(texts, shots, strict=True))]


def test_word_similarity_is_one_for_equal_captions_and_low_for_a_changed_key_word():
    assert word_similarity("a dog runs", "a dog runs") == 1.0
    assert word_similarity("a man is standing on the beach", "a man in a blue shirt is standing on the beach") == 1.0
    assert word_similarity("a cat sitting on a couch", "a cat laying on a couch") >= 0.8
    assert word_similarity("a black dog", "a white dog") < 0.8
    assert word_similarity("a brown dog runs through the grass", "a man is standing on the beach") < 0.5
    assert word_similarity("", "") == 1.0 and word_similarity("", "a dog") == 0.0


def test_same_and_near_same_neighbours_merge_into_one_cue_with_the_most_confident_text():
    cues = merge_samples(samples("a cat sitting on a couch", "a cat laying on a couch", "a cat sitting on a couch",
                                 "a red rocket"))
    assert [(c.start, c.end) for c in cues] == [(0.0, 6.0), (6.0, 8.0)]
    assert cues[0].text == "a cat sitting on a couch" and cues[0].score == -1.0


def test_equal_captions_in_different_shots_stay_apart():
    cues = merge_samples(samples("a dog", "a dog", "a dog", shots=[0, 0, 1]))
    assert [(c.start, c.end) for c in cues] == [(0.0, 4.0), (4.0, 6.0)]


def test_long_cues_are_split_into_equal_parts_no_longer_than_the_maximum():
    parts = split_long([Segment(10.0, 25.0, "a boat", -1.0)], max_duration=7.0)
    assert [(p.start, p.end) for p in parts] == [(10.0, 15.0), (15.0, 20.0), (20.0, 25.0)]
    assert split_long([Segment(0.0, 7.0, "x", -1.0)], 7.0) == [Segment(0.0, 7.0, "x", -1.0)]


def test_short_cues_are_extended_up_to_the_next_cue_and_the_video_end():
    cues = [Segment(0.0, 0.2, "a", -1.0), Segment(0.5, 0.7, "b", -1.0), Segment(3.0, 3.1, "c", -1.0)]
    shaped = shape_cues(cues, min_score=None, min_duration=1.0, max_duration=7.0, video_end=3.5)
    assert [(c.start, c.end) for c in shaped] == [(0.0, 0.5), (0.5, 1.5), (3.0, 3.5)]


def test_min_score_drops_doubtful_and_empty_cues():
    cues = [Segment(0.0, 2.0, "sure", -0.5), Segment(2.0, 4.0, "unsure", -3.0), Segment(4.0, 6.0, " ", -0.1)]
    shaped = shape_cues(cues, min_score=-2.0, min_duration=1.0, max_duration=7.0, video_end=6.0)
    assert [c.text for c in shaped] == ["sure"]
    assert shaped[0].end == pytest.approx(2.0)


def test_a_dropped_cue_leaves_its_stretch_a_gap_not_the_cue_before_it_lengthened():
    cues = [Segment(0.9, 1.2, "a cat", -0.5), Segment(1.2, 2.1, "", -0.1), Segment(2.1, 2.4, "unsure", -3.0),
            Segment(2.4, 4.0, "a toy", -0.5)]
    shaped = shape_cues(cues, min_score=-2.0, min_duration=1.0, max_duration=7.0, video_end=4.0)
    assert [(c.text, c.start, c.end) for c in shaped] == [("a cat", 0.9, 1.2), ("a toy", 2.4, 4.0)]


def frame(time, text="a dog", shot=0, span=None):
    return CaptionedFrame(time, text, -1.0, shot, span)


def test_a_uniformly_sampled_frame_stands_for_the_video_up_to_the_next_one():
    samples = frame_samples([frame(0.0), frame(2.0), frame(4.0)], video_end=5.5)
    assert [(s.start, s.end) for s in samples] == [(0.0, 2.0), (2.0, 4.0), (4.0, 5.5)]


def test_frames_of_a_shot_share_it_halfway_between_neighbours_and_cues_end_at_cuts():
    frames = [frame(1.0, span=(0.0, 4.0)), frame(3.0, span=(0.0, 4.0)), frame(6.0, shot=1, span=(4.0, 8.0))]
    samples = frame_samples(frames, video_end=8.0)
    assert [(s.start, s.end, s.shot) for s in samples] == [(0.0, 2.0, 0), (2.0, 4.0, 0), (4.0, 8.0, 1)]


def test_after_a_detector_failure_the_uniform_tail_follows_the_last_shot():
    frames = [frame(2.0, span=(0.0, 4.0)), frame(4.5, shot=1, span=(4.0, 5.0)), frame(5.0, shot=2),
              frame(6.0, shot=2)]
    samples = frame_samples(frames, video_end=7.0)
    assert [(s.start, s.end, s.shot) for s in samples] == [(0.0, 4.0, 0), (4.0, 5.0, 1), (5.0, 6.0, 2),
                                                           (6.0, 7.0, 2)]
    assert len(merge_samples(samples)) == 3  # same text, but never merged across shots


def test_a_shot_ending_past_the_decoded_end_is_cut_there():
    samples = frame_samples([frame(0.0, span=(0.0, 9.0))], video_end=6.5)
    assert [(s.start, s.end) for s in samples] == [(0.0, 6.5)]


def test_a_merged_cue_keeps_the_confidence_of_the_sample_it_shows():
    samples = [Sample(0.0, 2.0, "a dog runs", -1.2, confidence=0.3),
               Sample(2.0, 4.0, "a dog runs", -0.8, confidence=0.6)]
    assert merge_samples(samples) == [Segment(0.0, 4.0, "a dog runs", -0.8, 0.6)]
