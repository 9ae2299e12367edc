"""Small pieces the BackdoorBench baselines (fine-pruning, nad, anp, i-bau) share."""
from __future__ import annotations

from ..data.base import Data


def crop_padding(data: Data) -> int:
    """The crop padding of the standard augmentation, scaled to the image size: BackdoorBench
    pads CIFAR's 32-pixel images by 4; an 8-pixel image gets 1 (4 pixels of padding there
    moves most of the digit out of view and wrecks the BatchNorm statistics)."""
    if data.modality != "image":
        return 0
    return max(1, round(4 * data.shape[-1] / 32))
