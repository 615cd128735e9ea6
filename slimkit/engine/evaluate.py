"""Accuracy of a network on a dataset (eval mode, no gradients)."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


def device_layout(x: torch.Tensor, device: str) -> torch.Tensor:
    """Images in channels_last on CUDA (tensor-core convs want NHWC); unchanged elsewhere."""
    if str(device).startswith("cuda") and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@torch.inference_mode()
def predictions(model: nn.Module | Sequence[nn.Module], dataset: Dataset, batch_size: int = 256,
                device: str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(predicted class, label) per batch, both on the CPU; each batch runs on ``device`` in eval mode.

    Several models answer together: the class of the mean of their logits (an ensemble)."""
    models = [model] if isinstance(model, nn.Module) else list(model)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size):
            x = device_layout(x.to(device), device)
            yield (sum(m(x) for m in models) / len(models)).argmax(1).cpu(), y
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)


def accuracy(model: nn.Module | Sequence[nn.Module], dataset: Dataset, batch_size: int = 256,
             device: str = "cpu") -> float:
    """Top-1 accuracy in [0, 1] of a model, or of the mean logits of several."""
    correct = total = 0
    for pred, y in predictions(model, dataset, batch_size, device):
        correct += int((pred == y).sum())
        total += len(y)
    return correct / max(total, 1)
