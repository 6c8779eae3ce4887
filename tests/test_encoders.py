"""The default encoder's weights are real: its ImageNet head recognizes known photos."""

import pytest
import torch
from conftest import SAMPLES

from captioner.encoders import ENCODERS, build_encoder
from captioner.errors import ModelLoadError
from captioner.images import model_pixels

TABBY, TIGER_CAT, PERSIAN, SIAMESE, EGYPTIAN = 281, 282, 283, 284, 285
COFFEE_MUG, ESPRESSO, CUP = 504, 967, 968


LITES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


@pytest.fixture(scope="module", params=sorted(LITES))
def lite(request):
    return build_encoder(request.param).eval()


def top5(encoder, name):
    pixels = torch.from_numpy(model_pixels(SAMPLES / name, encoder.preprocess.size))[None]
    image = encoder.preprocess.normalize(pixels)
    with torch.inference_mode():
        logits = encoder.features.net(image)
    return set(logits.topk(5).indices[0].tolist())


def test_lite_ranks_a_cat_class_top5_for_chelsea(lite):
    assert top5(lite, "chelsea.png") & {TABBY, TIGER_CAT, PERSIAN, SIAMESE, EGYPTIAN}


def test_lite_ranks_espresso_or_cup_top5_for_coffee(lite):
    assert top5(lite, "coffee.png") & {ESPRESSO, CUP, COFFEE_MUG}


def test_lite_grid_shape_and_preprocessing_constants(lite):
    size = LITES[lite.name]
    grid = lite(torch.zeros(2, 3, size, size))
    assert grid.shape == (2, 1280, (size + 31) // 32, (size + 31) // 32)  # 7x7, 8x8, 9x9
    assert lite.preprocess.size == size
    # (x - 127) / 128 on the 0..255 scale
    assert lite.preprocess.normalize(torch.full((1, 2, 2, 3), 255, dtype=torch.uint8)).max() == pytest.approx(1.0)


@pytest.mark.parametrize("name, channels", [("resnet50", 2048), ("efficientnet_b0", 1280)])
def test_torchvision_backbones_build_without_download(name, channels):
    encoder = build_encoder(name, pretrained=False).eval()
    with torch.inference_mode():
        grid = encoder(torch.zeros(1, 3, 224, 224))
    assert grid.shape == (1, channels, 7, 7)
    assert encoder.out_channels == channels
    assert encoder.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))  # read from torchvision's metadata


def test_unknown_encoder_is_named_in_the_error():
    with pytest.raises(ModelLoadError, match="vgg99"):
        build_encoder("vgg99")
    assert {"efficientnet_lite0", "resnet50", "efficientnet_b0"} <= set(ENCODERS)


def test_bundled_imagenet_labels_are_torchvisions():
    from torchvision.models import EfficientNet_B0_Weights

    from captioner.encoders import imagenet_classes

    assert imagenet_classes() == tuple(EfficientNet_B0_Weights.DEFAULT.meta["categories"])


def test_folding_batch_norm_keeps_the_grid_and_is_refused_in_training_mode(lite):
    import copy

    folded = copy.deepcopy(lite)
    folded.fold_batch_norm()
    assert folded.folded and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    pixels = torch.from_numpy(model_pixels(SAMPLES / "chelsea.png", lite.preprocess.size))[None]
    assert torch.allclose(folded.encode(pixels), lite.encode(pixels), atol=1e-4)
    with pytest.raises(RuntimeError, match="inference only"):
        copy.deepcopy(lite).train().fold_batch_norm()


def test_a_folded_encoder_refuses_training_and_folding_in_inference_mode_leaves_plain_weights(lite):
    import copy

    folded = copy.deepcopy(lite)
    with torch.inference_mode():  # as a caller loading the model inside inference mode would
        folded.fold_batch_norm()
    assert not any(p.is_inference() for p in folded.parameters())
    assert not any(m.training for m in folded.modules())
    folded.features(torch.zeros(1, 3, 64, 64))  # a plain forward, autograd on
    with pytest.raises(RuntimeError, match="folded for inference"):
        folded.train()
