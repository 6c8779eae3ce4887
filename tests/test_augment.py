"""Training regularizers: word dropout on the decoder's inputs, random crops of cached grids."""

import torch

from captioner.augment import crop_grids, drop_words

PAD, START, UNK = 0, 1, 3


def _captions(rows: int = 400, length: int = 12) -> torch.Tensor:
    tokens = torch.randint(4, 50, (rows, length))
    tokens[:, 0] = START
    tokens[::2, 8:] = PAD  # every other caption is shorter
    return tokens


def test_word_dropout_replaces_about_the_rate_of_words_but_never_start_or_padding():
    torch.manual_seed(0)
    tokens = _captions()
    dropped = drop_words(tokens, 0.3, unk=UNK, pad=PAD)
    changed = dropped != tokens
    assert torch.equal(dropped[:, 0], tokens[:, 0])
    assert torch.equal(dropped[tokens == PAD], tokens[tokens == PAD])
    assert bool((dropped[changed] == UNK).all())
    words = (tokens != PAD).sum() - tokens.shape[0]
    assert abs(changed.sum().item() / words.item() - 0.3) < 0.03


def test_word_dropout_off_returns_the_inputs_untouched():
    tokens = _captions()
    assert drop_words(tokens, 0.0, unk=UNK, pad=PAD) is tokens


def test_grid_crop_keeps_the_shape_and_zooms_into_part_of_the_grid():
    torch.manual_seed(0)
    ramp = torch.linspace(-1, 1, 7).expand(7, 7)  # value = horizontal position
    grids = torch.stack([ramp, ramp.T]).expand(64, 2, 7, 7).contiguous()  # (B, C, h, w): x and y channels
    cropped = crop_grids(grids, 0.5)
    assert cropped.shape == grids.shape
    spans = cropped.amax(dim=(2, 3)) - cropped.amin(dim=(2, 3))  # (B, 2) range of positions seen
    assert bool((spans < 2.0 + 1e-5).all()) and bool((spans > 0.5 * 12 / 7 - 1e-3).all())
    assert spans.std() > 0.05  # crop sizes vary from image to image
    assert bool((cropped.amin(dim=(2, 3)) >= -1 - 1e-5).all())  # never samples outside the grid


def test_grid_crop_of_one_is_off_and_a_constant_grid_stays_constant():
    grids = torch.randn(4, 8, 7, 7)
    assert crop_grids(grids, 1.0) is grids
    constant = torch.full((4, 8, 7, 7), 2.5)
    assert torch.allclose(crop_grids(constant, 0.6), constant)
