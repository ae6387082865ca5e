"""The PatchGAN discriminator (pix2pix's NLayerDiscriminator) used by VQGAN and LlamaGen.

Strided 4x4 convolutions with BatchNorm and LeakyReLU; the output is a map of real/fake logits,
one per overlapping patch (70x70 pixels for 3 layers), not one logit per image.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class PatchGANDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last block keeps the resolution
            layers += [
                # no bias: BatchNorm's shift makes it redundant
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> patch logits (B, 1, h, w)."""
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    # DCGAN initialisation, as in taming-transformers
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
