"""The networks of the recipes: ``MLP``, ``SmallCNN`` and ``resnet18`` (torchvision, imported lazily).

Every network maps ``(batch, *image_shape)`` float inputs to ``(batch, num_classes)`` logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_stablelr.validation import check_in_range, check_int_at_least

__all__ = ["MLP", "SmallCNN", "resnet18"]


class MLP(nn.Module):
    """``Flatten → [Linear → ReLU (→ Dropout)] * len(hidden_dims) → Linear``.

    The default ``64-512-512-10`` is the network of the design's evidence runs on 300 digits: big enough to
    memorize the train split, so validation loss turns up and the gap factor has work to do.

    Args:
        input_dim: flattened input size (``${data.input_dim}`` in the configs).
        hidden_dims: widths of the hidden layers (each ``>= 1``; empty gives a linear model).
        num_classes: number of logits.
        dropout: dropout after each hidden ReLU (in ``[0, 1)``; 0 disables it).
    """

    def __init__(
        self, input_dim: int = 64, hidden_dims: Sequence[int] = (512, 512), num_classes: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        check_int_at_least("input_dim", input_dim, 1)
        check_int_at_least("num_classes", num_classes, 2)
        dropout = check_in_range("dropout", dropout, 0.0, 1.0, high_inclusive=False)
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_dim
        for index, hidden in enumerate(hidden_dims):
            check_int_at_least(f"hidden_dims[{index}]", hidden, 1)
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SmallCNN(nn.Module):
    """Per entry of ``channels``: ``[Conv3x3 → (BatchNorm) → ReLU] * 2 → MaxPool2``; then global average
    pooling and a linear head. Works for 8x8 (digits) and 32x32 (CIFAR-10) inputs alike: each stage halves
    the resolution and the global pooling absorbs what is left (at least 2x2 is needed per pooling stage,
    so ``len(channels) <= log2(min(height, width))``).

    Args:
        image_shape: ``[channels, height, width]`` of the input (``${data.image_shape}``).
        channels: output channels of each stage.
        num_classes: number of logits.
        batch_norm: BatchNorm after each convolution (exercises the monitor's BatchNorm handling).
    """

    def __init__(
        self,
        image_shape: Sequence[int] = (1, 8, 8),
        channels: Sequence[int] = (32, 64),
        num_classes: int = 10,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(
                f"`image_shape` must be [channels, height, width], got {list(image_shape)}. "
                "Use a data option with images (digits, synthetic, cifar10)."
            )
        in_channels, height, width = (int(size) for size in image_shape)
        if min(height, width) < 2 ** len(channels):
            raise ValueError(
                f"`channels` must have at most log2(min(height, width)) = {min(height, width).bit_length() - 1} "
                f"stages for {height}x{width} inputs, got {len(channels)}. Shorten model.net.channels."
            )
        check_int_at_least("num_classes", num_classes, 2)
        stages: list[nn.Module] = []
        for index, out_channels in enumerate(channels):
            check_int_at_least(f"channels[{index}]", out_channels, 1)
            for conv_in in (in_channels, out_channels):
                stages.append(nn.Conv2d(conv_in, out_channels, 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    stages.append(nn.BatchNorm2d(out_channels))
                stages.append(nn.ReLU())
            stages.append(nn.MaxPool2d(2))
            in_channels = out_channels
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def resnet18(image_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, small_input: bool = True) -> nn.Module:
    """torchvision's ResNet-18, trained from scratch (no weights are downloaded).

    ``small_input=True`` is the usual CIFAR adaptation: the 7x7 stride-2 stem and the max-pool are replaced
    by a 3x3 stride-1 convolution, so 32x32 inputs are not reduced to 1x1 before the last stage.
    torchvision is imported here, not at module import: a missing torchvision raises a ``RecipeError``
    saying ``pip install torchvision``.
    """
    from recipes.cifar10 import import_torchvision

    torchvision = import_torchvision()
    check_int_at_least("num_classes", num_classes, 2)
    in_channels = int(image_shape[0])
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if small_input:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model
