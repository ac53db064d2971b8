"""Small classic networks used in the sparsity literature, plus a CNN for 8x8 digits.

Every constructor takes ``num_classes``, ``in_chans`` and ``img_size`` (the data's shape),
so the factory can call them all the same way.
"""

from __future__ import annotations

import torch
from torch import nn


def _flat_features(features: nn.Module, in_chans: int, img_size: int) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, in_chans, img_size, img_size)).numel()


class DigitsCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (``width``, ``width``, ``2 width``, ``2 width`` channels) with a
    2x2 max-pool after the second and fourth, global average pool, one linear classifier.

    Made for 8x8 digits (any size works). Every linear map but the classifier is followed by
    BatchNorm, so the net also trains from a sparse random initialisation (static, RigL).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 8, width: int = 32):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_chans, width),
            *block(width, width),
            nn.MaxPool2d(2, ceil_mode=True),
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class LeNet300100(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998; the MLP of the lottery-ticket papers): 300 and 100 hidden units."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_chans * img_size * img_size, 300),
            nn.ReLU(inplace=True),
            nn.Linear(300, 100),
            nn.ReLU(inplace=True),
            nn.Linear(100, num_classes),
        )

    def forward(self, x):
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5: conv 6@5x5 (padding 2), pool, conv 16@5x5, pool, linear 120-84-classes, ReLU.

    For inputs smaller than 16 px the second conv is padded too, so 8x8 digits still fit.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=0 if img_size >= 16 else 2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(_flat_features(self.features, in_chans, img_size), 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        self.pad = 0
        if stride != 1 or c_in != c_out:
            if shortcut == "A":  # subsample and zero-pad the channels: no parameters
                self.shortcut = nn.Identity()
                self.stride, self.pad = stride, c_out - c_in
            else:  # "B": 1x1 conv projection with BatchNorm
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad:
            x = x[:, :, :: self.stride, :: self.stride]
            x = nn.functional.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        else:
            x = self.shortcut(x)
        return torch.relu(out + x)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR (He et al. 2016, section 4.2): 3x3 stem with 16 channels, three
    stages of ``n`` basic blocks with 16/32/64 channels (times ``width``), global average pool, linear.

    ``shortcut="A"`` (the paper's CIFAR choice, default): identity shortcuts, subsampled and
    zero-padded where the shape changes, so every prunable weight is a 3x3 conv or the classifier.
    ``shortcut="B"``: 1x1 conv + BatchNorm projections where the shape changes (as in OpenLTH).
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 32,
        width: int = 1,
        shortcut: str = "A",
    ):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got depth={depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut={shortcut!r} is unknown; allowed: 'A' (zero-padding identity), 'B' (1x1 conv)")
        n = (depth - 2) // 6
        channels = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        blocks, c_in = [], channels[0]
        for stage, c_out in enumerate(channels):
            for i in range(n):
                blocks.append(_BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1, shortcut))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


VGG_CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class CifarVGG(nn.Module):
    """VGG-11/13/16/19 for CIFAR with BatchNorm (as in OpenLTH and the GraNet/RigL CIFAR code):
    3x3 conv-BN-ReLU stages with four 2x2 max-pools, global average pool, one linear classifier.

    ``width`` scales every channel count (e.g. 0.25 for quick tests). Pools use ``ceil_mode``
    so inputs down to 8x8 work.
    """

    def __init__(
        self, depth: int = 16, num_classes: int = 10, in_chans: int = 3, img_size: int = 32, width: float = 1.0
    ):
        super().__init__()
        if depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth={depth} is unknown; allowed: {sorted(VGG_CONFIGS)}")
        layers, c_in = [], in_chans
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                c_out = max(1, int(round(v * width)))
                layers += [
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                ]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class _WideBlock(nn.Module):
    """Pre-activation basic block (BN-ReLU-conv twice), 1x1 conv shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class CifarWideResNet(nn.Module):
    """Wide ResNet WRN-``depth``-``width`` for CIFAR (Zagoruyko & Komodakis 2016), e.g. WRN-22-2 of the
    RigL CIFAR-10 experiments: 3x3 stem with 16 channels, three stages of ``(depth - 4) / 6``
    pre-activation blocks with 16/32/64 times ``width`` channels, BN-ReLU, global average pool, linear."""

    def __init__(self, depth: int = 22, width: int = 2, num_classes: int = 10, in_chans: int = 3, img_size: int = 32):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Wide ResNet depth must be 6n+4 (16, 22, 28, 40), got depth={depth}")
        n, channels = (depth - 4) // 6, [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        blocks, c_in = [], 16
        for stage, c_out in enumerate(channels):
            for i in range(n):
                blocks.append(_WideBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.blocks, self.bn = nn.Sequential(*blocks), nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = torch.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
