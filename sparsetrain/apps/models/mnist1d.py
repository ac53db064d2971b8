"""The MNIST-1D paper's networks (Greydanus & Kobak 2024; ``notebooks/models.py`` and
``notebooks/lottery-tickets.ipynb`` in greydanus/mnist1d), for inputs ``(B, in_chans, length)``.

Both keep PyTorch's default initialisation, as the paper's code does.
"""

from __future__ import annotations

import torch
from torch import nn


class MNIST1DMLP(nn.Module):
    """``fc1: in -> hidden``, ReLU; a residual hidden layer ``h + ReLU(fc2(h))``; ``fc3: hidden -> classes``.

    ``hidden=500`` is the lottery-ticket notebook's MLP (40-500-500-10: 275,000 weights, 276,010
    parameters); the paper's benchmark MLP (``MLPBase``) is the same with ``hidden=100``.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 40, hidden: int = 500):
        super().__init__()
        self.fc1 = nn.Linear(in_chans * img_size, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        h = torch.relu(self.fc1(torch.flatten(x, 1)))
        h = h + torch.relu(self.fc2(h))
        return self.fc3(h)


class MNIST1DCNN(nn.Module):
    """The paper's 1-D CNN (``ConvBase``): three ReLU convolutions with ``channels`` channels (kernel 5,
    then 3 and 3; stride 2, padding 1: length 40 -> 19 -> 10 -> 5) and a linear classifier on the
    flattened features (25 x 5 = 125 -> 10). 5,125 weights, 5,210 parameters with the biases."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 40, channels: int = 25):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(in_chans, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_chans, img_size)).shape[1]
        self.fc = nn.Linear(flat, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))
