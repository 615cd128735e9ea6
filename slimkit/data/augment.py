"""Training augmentation presets, seeded per item (the same draws with any number of loader processes)."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from slimkit.core.errors import SlimkitError
from slimkit.data.loading import SeededItems

AUGMENTS = ("none", "shift", "flip", "crop-flip", "trivialaugment", "randaugment")


AUGMENT_HELP = ("training augmentation: auto (the default: shift below 64 px, crop-flip from 64 px) | none | "
                "shift (random translation by up to 1/8 of the side) | flip (horizontal) | crop-flip "
                "(RandomResizedCrop, scale from 0.5 below 64 px, 0.25 below 128 px, 0.08 above, + flip) | "
                "trivialaugment | randaugment (shift, then TrivialAugmentWide / RandAugment)")


SMALL_INPUT = 64  # below this side images are resized to the input size; from it, ImageNet's 256/224 margin


def resolve_augment(name: str, image_size: int) -> str:
    """The preset ``name`` (or ``auto``'s choice for ``image_size``); unknown names are refused."""
    if name == "auto":
        return "shift" if image_size < SMALL_INPUT else "crop-flip"
    if name not in AUGMENTS:
        raise SlimkitError(f"unknown --augment preset {name!r}; available: auto, {', '.join(AUGMENTS)}")
    return name


def crop_scale(image_size: int) -> tuple[float, float]:
    """RandomResizedCrop's area range: ImageNet's 8 % lower bound only for ImageNet-sized inputs."""
    return (0.5 if image_size < SMALL_INPUT else 0.25 if image_size < 128 else 0.08, 1.0)


def resize_policy(image_size: int) -> str:
    """'fit': shorter side to the input size, centre crop; 'imagenet': shorter side to size*256/224, centre crop."""
    return "fit" if image_size < SMALL_INPUT else "imagenet"


def preprocess_meta(preset: str, resize: str, mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
    """What a checkpoint records about its inputs: evaluation applies ``resize`` and ``(x/255 - mean)/std``."""
    return {"augment": preset, "resize": resize, "mean": list(mean), "std": list(std)}


def _geometry(preset: str, size: tuple[int, int], store: tuple[int, int]):
    """The per-image training transform of ``preset`` on a uint8 (C, H, W) tensor of side ``store``."""
    from torchvision.transforms import v2

    h, w = size
    centre = [v2.CenterCrop(size)] if store != size else []
    shift = centre + [v2.RandomCrop(size, padding=[max(1, w // 8), max(1, h // 8)])]
    steps = {"none": centre, "shift": shift, "flip": centre + [v2.RandomHorizontalFlip()],
             "crop-flip": [v2.RandomResizedCrop(size, scale=crop_scale(min(h, w)), antialias=True),
                           v2.RandomHorizontalFlip()],
             "trivialaugment": shift + [v2.TrivialAugmentWide()], "randaugment": shift + [v2.RandAugment()]}[preset]
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else v2.Compose(steps)  # Compose costs as much as a crop on a small image


def _sample_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + 17) % (2**63)


def _seeded(transform, x: torch.Tensor, key) -> torch.Tensor:
    """``transform(x)`` drawn from a seed of (epoch seed, item): the same draws in any worker, with any worker count."""
    if not isinstance(key, tuple):  # a plain index: draw from the caller's generator
        return transform(x)
    # torchvision draws from the global CPU generator. Seed it directly (torch.manual_seed also
    # visits every accelerator backend: ~1 ms an item); in the training process put its state back.
    gen = torch.default_generator
    if torch.utils.data.get_worker_info() is not None:  # a loader process: its generator is ours alone
        gen.manual_seed(_sample_seed(*key[::-1]))
        return transform(x)
    state = gen.get_state()
    try:
        gen.manual_seed(_sample_seed(*key[::-1]))
        return transform(x)
    finally:
        gen.set_state(state)


class Augmented(SeededItems):
    """A TensorDataset of images in [-1, 1] (the bundled digits) with a per-item seeded torchvision preset."""

    def __init__(self, base: TensorDataset, preset: str):
        self.base, self.preset = base, preset
        size = tuple(base.tensors[0].shape[-2:])
        self.transform = _geometry(preset, size, size)
        self.tensors = base.tensors  # labels_of reads these
        self.workers = 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        x, y = self.base[i]
        return _seeded(self.transform, x.add(1).div_(2), key).mul_(2).sub_(1), y  # transforms see [0, 1]
