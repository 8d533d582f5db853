"""The PyTorch networks behind the reference models (needed for training and the eager-mode benchmark)."""

from __future__ import annotations

import math

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
    """Conv layers -> a per-position logit map -> log-sum-exp pooling -> one logit.

    The logit map is the class-activation map (as in Zhou et al. 2016, with the classifier applied
    before pooling rather than after): ``forward`` returns P(finding) and sigmoid(logit map), i.e. a
    local probability per cell at 1/16 of the input resolution. Log-sum-exp pooling behaves like a
    soft maximum, so a small focal finding is not averaged away as with global average pooling.
    """

    def __init__(self, base: int = 8, sharpness: float = 4.0) -> None:
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
        self.head = nn.Conv2d(8 * c, 1, 1)
        self.sharpness = sharpness

    def logit_and_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit_map = self.head(self.features(x))
        flat = logit_map.flatten(1)
        r = self.sharpness
        logit = (torch.logsumexp(r * flat, dim=1, keepdim=True) - math.log(flat.shape[1])) / r
        return logit, logit_map

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit, logit_map = self.logit_and_map(x)
        return torch.sigmoid(logit), torch.sigmoid(logit_map)


class SegmentationGraph(nn.Module):
    """The exported lung-seg graph: HU slices in, one label per pixel out, all inside ONNX Runtime.

    Window (centre/width in HU) to 0..1, average-pool by ``factor`` (a 512 matrix becomes the 128 × 128
    the U-Net was trained on, exactly as ``pipelines.preprocess.resize_slices`` averaged blocks in
    training), the U-Net's softmax, bilinear upsampling of the class probabilities back by ``factor``
    (so mask edges are not blocky) and the argmax, cast to uint8. Fusing these into the graph lets
    ONNX Runtime's kernels do the per-pixel work instead of NumPy.
    """

    def __init__(self, net: nn.Module, center_hu: float, width_hu: float, factor: int = 4) -> None:
        super().__init__()
        self.net = net
        self.low = center_hu - width_hu / 2
        self.width = width_hu
        self.factor = factor

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        x = torch.clamp((hu - self.low) / self.width, 0.0, 1.0)
        x = nn.functional.avg_pool2d(x, self.factor)
        probs = nn.functional.interpolate(self.net(x), scale_factor=self.factor, mode="bilinear", align_corners=False)
        return probs.argmax(dim=1).to(torch.uint8)
