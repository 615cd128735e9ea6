"""Accuracy of a network on a dataset (eval mode, no gradients)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


def device_layout(x: torch.Tensor, device: str) -> torch.Tensor:
    """Images in channels_last on CUDA (tensor-core convs want NHWC); unchanged elsewhere."""
    if str(device).startswith("cuda") and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@torch.inference_mode()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: str = "cpu") -> float:
    """Top-1 accuracy in [0, 1]."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size):
            pred = model(device_layout(x.to(device), device)).argmax(1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    return correct / max(total, 1)
