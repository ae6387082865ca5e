"""Tokenizer losses: LPIPS perceptual loss, hinge GAN losses, the adaptive GAN weight.

LPIPS needs torchvision's ImageNet VGG16 weights for its backbone. There is no model hub here, so
they are used only when already in the torch hub cache (``vgg16-397923af.pth`` under
``$TORCH_HOME/hub/checkpoints``); otherwise the backbone is random and the perceptual loss is only a
smoke test of the code path, which is logged loudly.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.log import get_logger

log = get_logger(__name__)

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1


def vgg16_weights_path() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)


def build_lpips(backbone: Literal["auto", "pretrained", "random"] = "auto") -> torch.nn.Module:
    """A frozen ``lpips.LPIPS(net="vgg")`` in eval mode.

    ``auto`` uses the ImageNet VGG16 weights when they are in the torch hub cache and a random
    backbone otherwise; ``pretrained`` fails without them; ``random`` never looks for them.
    """
    import lpips

    have = os.path.exists(vgg16_weights_path())
    if backbone == "pretrained" and not have:
        raise FileNotFoundError(
            f"lpips_backbone=pretrained but {vgg16_weights_path()} is missing: copy torchvision's "
            f"{VGG16_FILE} there (no downloads are made)"
        )
    random_backbone = backbone == "random" or not have
    if random_backbone:
        log.warning(
            "\n%s\n!! LPIPS IS USING A RANDOM VGG16 BACKBONE: the perceptual loss is NOT LPIPS.\n"
            "!! Put torchvision's %s in %s for real training.\n%s",
            "!" * 78,
            VGG16_FILE,
            os.path.dirname(vgg16_weights_path()),
            "!" * 78,
        )
    # lpips prints its set-up and calls torchvision's deprecated ``pretrained=``: keep both quiet
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=random_backbone, verbose=False)
    net.eval().requires_grad_(False)
    net.random_backbone = random_backbone  # type: ignore[attr-defined]
    return net


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: push real logits above 1 and fake ones below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: raise the discriminator's logits on reconstructions."""
    return -logits_fake.mean()


def adaptive_gan_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """||grad nll|| / ||grad g|| at the decoder's last layer (taming-transformers' balance)."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(w, 0.0, max_weight).detach()


def psnr_from_mse(mse: torch.Tensor | float, data_range: float = 2.0) -> float:
    """PSNR in dB of a mean squared error for images spanning ``data_range`` ([-1, 1] -> 2).

    At most 100 dB (the MSE floored at 1e-10 of the range squared, as ``evaluate.psnr`` does):
    an exact reconstruction would give inf, which strict JSON (the metrics log) cannot hold."""
    mse = max(float(mse), 1e-10 * data_range**2)
    return 10.0 * torch.log10(torch.tensor(data_range**2 / mse)).item()
