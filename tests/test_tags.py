"""Tags: at most five labels, at or above the threshold, likeliest first."""

import torch

from captioner.tags import MAX_TAGS, TAG_THRESHOLD, Tag, top_tags

NAMES = tuple(f"class {i}" for i in range(8))


def test_labels_at_or_above_the_threshold_likeliest_first_at_most_five():
    probs = torch.tensor([
        [0.05, 0.30, 0.10, 0.20, 0.12, 0.11, 0.03, 0.09],  # five at or above 0.1
        [0.90, 0.02, 0.02, 0.02, 0.01, 0.01, 0.01, 0.01],
        [0.125] * 8,
    ])
    first, second, flat = top_tags(probs, NAMES)
    assert [t.label for t in first] == ["class 1", "class 3", "class 4", "class 5", "class 2"]
    assert second == [Tag("class 0", 0.9)]
    assert len(flat) == MAX_TAGS and all(t.p == 0.125 for t in flat)  # eight qualify: five are kept
    assert top_tags(torch.full((1, 8), 0.099), NAMES) == [[]]  # nothing reaches TAG_THRESHOLD
    assert TAG_THRESHOLD == 0.1


def test_the_default_model_tags_the_coffee_photo_espresso(default_model):
    from conftest import SAMPLES

    from captioner.images import model_pixels

    pixels = torch.from_numpy(model_pixels(SAMPLES / "coffee.png", 224))[None]
    (tags,) = default_model.tags(default_model.encode(pixels))
    assert tags[0].label == "espresso" and tags[0].p > 0.5
