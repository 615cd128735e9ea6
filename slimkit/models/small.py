"""Small nets for small images (the bundled 8x8 digits, CIFAR-sized data)."""
from __future__ import annotations

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.models.registry import register_model


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            # projection shortcut (ResNet "option B"): keeps every stage a clean residual stream
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) of He et al. for small images: three stages of width w, 2w, 4w."""

    def __init__(self, num_classes: int, depth: int, width: int, in_chans: int):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise SlimkitError(f"cifar_resnet depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, num_classes)


@register_model("cifar_resnet", input_shape=lambda a: (a["in_chans"], a["image_size"], a["image_size"]))
def cifar_resnet(num_classes: int = 10, depth: int = 20, width: int = 16, in_chans: int = 3,
                 image_size: int = 32) -> nn.Module:
    # image_size does not change the weights; it is recorded so the checkpoint knows its input shape
    return CifarResNet(num_classes, depth, width, in_chans)


class SmallVGG(nn.Module):
    """Conv-BN-ReLU stages with max-pooling, then a flatten and a two-layer classifier.

    The flatten makes the first Linear read C*H*W features, the case where a Linear must follow the
    channels it reads.
    """

    def __init__(self, num_classes: int, widths: tuple[int, ...], in_chans: int, image_size: int, hidden: int):
        super().__init__()
        layers, cin, size = [], in_chans, image_size
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, 1, 1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin, size = w, size // 2
        if size < 1:
            raise SlimkitError(f"small_vgg: image_size {image_size} is too small for {len(widths)} pooling stages")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(cin * size * size, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("small_vgg", input_shape=lambda a: (a["in_chans"], a["image_size"], a["image_size"]))
def small_vgg(num_classes: int = 10, widths: tuple[int, ...] = (32, 64), in_chans: int = 1, image_size: int = 8,
              hidden: int = 128) -> nn.Module:
    return SmallVGG(num_classes, tuple(widths), in_chans, image_size, hidden)


class MLP(nn.Module):
    """Flatten, then Linear-ReLU layers: the network of the DEN experiments."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int):
        super().__init__()
        layers, cin = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.ReLU(inplace=True)]
            cin = h
        layers.append(nn.Linear(cin, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model("mlp", input_shape=lambda a: (a["in_chans"], a["image_size"], a["image_size"]))
def mlp(num_classes: int = 10, hidden: tuple[int, ...] = (312, 128), in_chans: int = 1, image_size: int = 8) -> nn.Module:
    return MLP(in_chans * image_size * image_size, tuple(hidden), num_classes)
