"""The PyTorch networks behind the reference models (needed for training and the eager-mode benchmark)."""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet2D(nn.Module):
    """A small 2D U-Net (three poolings) ending in a softmax over ``n_classes`` (background first)."""

    def __init__(self, base: int = 12, n_classes: int = 3) -> None:
        super().__init__()
        c = base
        self.enc1, self.enc2, self.enc3 = _block(1, c), _block(c, 2 * c), _block(2 * c, 4 * c)
        self.bottom = _block(4 * c, 8 * c)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec3, self.dec2, self.dec1 = _block(12 * c, 4 * c), _block(6 * c, 2 * c), _block(3 * c, c)
        self.head = nn.Conv2d(c, n_classes, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        b = self.bottom(self.pool(e3))
        d3 = self.dec3(torch.cat([self.up(b), e3], 1))
        d2 = self.dec2(torch.cat([self.up(d3), e2], 1))
        d1 = self.dec1(torch.cat([self.up(d2), e1], 1))
        return self.head(d1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


class OpacityCNN(nn.Module):
    """Conv layers -> global average pool -> one logit; ``forward`` also returns the class-activation map.

    The CAM is the final conv features weighted by the classifier weights (Zhou et al. 2016), ReLU'd
    and scaled to 0..1 per image, at 1/16 of the input resolution.
    """

    def __init__(self, base: int = 8) -> None:
        super().__init__()
        c = base
        layers: list[nn.Module] = []
        chans = [1, c, 2 * c, 4 * c, 8 * c]
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        layers += [nn.Conv2d(8 * c, 8 * c, 3, padding=1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(8 * c, 1)

    def logit_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.fc(f.mean(dim=(2, 3))), f

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit, f = self.logit_and_features(x)
        cam = torch.relu(torch.einsum("nchw,c->nhw", f, self.fc.weight[0])).unsqueeze(1)
        cam = cam / (cam.amax(dim=(2, 3), keepdim=True) + 1e-6)
        return torch.sigmoid(logit), cam
