"""Static inference cost of a network: parameters and multiply-accumulates."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["count_params", "count_macs", "MacCounter", "device_of", "example_input"]


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the CPU for a network without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def example_input(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A (batch, *input_shape) input on ``model``'s device: zeros, or normal draws of a CPU ``generator``
    (the same numbers whatever the device), for every forward slimkit runs on a caller's model."""
    if generator is None:
        return torch.zeros(batch, *input_shape, device=device_of(model))
    return torch.randn(batch, *input_shape, generator=generator).to(device_of(model))


def count_params(model: nn.Module, nonzero: bool = False) -> int:
    """Parameters of ``model`` as stored densely, or only the non-zero ones (what sparse storage keeps)."""
    return sum(int(p.ne(0).sum()) if nonzero else p.numel() for p in model.parameters())


class MacCounter:
    """Counts multiply-accumulates of conv and linear layers during the forwards run inside it.

    Conv and linear layers hold all but a fraction of a percent of a CNN's arithmetic; BN,
    activations and pooling are left out (they fold into convs or are memory-bound). Counting
    rides on forwards the caller runs anyway, so it costs no extra pass.
    """

    def __init__(self, model: nn.Module):
        self.model, self.total, self.samples, self._handles = model, 0, 0, []

    def _conv(self, m: nn.Conv2d, inp, out):  # out: (B, C_out, H', W')
        self.total += out.numel() * m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)

    def _linear(self, m: nn.Linear, inp, out):  # out: (B, ..., out_features)
        self.total += out.numel() * m.in_features

    def _batch(self, m, args):
        self.samples += args[0].shape[0]

    def __enter__(self) -> "MacCounter":
        self._handles.append(self.model.register_forward_pre_hook(self._batch))
        for m in self.model.modules():
            if isinstance(m, nn.Conv2d):
                self._handles.append(m.register_forward_hook(self._conv))
            elif isinstance(m, nn.Linear):
                self._handles.append(m.register_forward_hook(self._linear))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def per_sample(self) -> int:
        return self.total // max(self.samples, 1)


@torch.inference_mode()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one (C, H, W) input (conv and linear layers)."""
    was_training = model.training
    model.eval()
    try:
        with MacCounter(model) as mc:
            model(example_input(model, input_shape))
    finally:
        model.train(was_training)
    return mc.per_sample
