"""The network of Dynamically Expandable Networks: hidden units with timestamps, one head per task."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.models.registry import register_model


class DENNet(nn.Module):
    """A multi-task network whose hidden units carry timestamps (Dynamically Expandable Networks).

    ``hidden`` holds the unit layers in order: 3x3 convs (units are channels; ReLU, then 2x2 max-pool
    while the map is at least 2 wide, and a global average pool after the last) followed by Linear
    layers (units are neurons). ``stamp{l}`` records the task (1-based) at which each unit of layer l
    was added. ``forward(x, task)`` is timestamped inference: the subnetwork of units stamped <= ``task``
    answers through head ``task``; later units take no part. ``forward(x)`` runs every unit and concatenates all heads (what
    tracing and surgery see).
    """

    def __init__(self, input_shape: tuple[int, ...], hidden: tuple[int, ...], heads: tuple[int, ...],
                 channels: tuple[int, ...] = ()):
        super().__init__()
        self.hidden = nn.ModuleList()
        self.n_conv = len(channels)
        cin, size = input_shape[0], input_shape[-1]
        self._pool = []
        for ch in channels:
            self.hidden.append(nn.Conv2d(cin, ch, 3, padding=1))
            self._pool.append(size >= 2)
            size = size // 2 if size >= 2 else size
            cin = ch
        if not channels:
            cin = math.prod(input_shape)  # plain arithmetic: no tensor on the default device
        for h in hidden:
            self.hidden.append(nn.Linear(cin, h))
            cin = h
        for i, layer in enumerate(self.hidden):
            self.register_buffer(f"stamp{i}", torch.ones(layer.weight.shape[0], dtype=torch.long))
        self.heads = nn.ModuleList(nn.Linear(cin, n) for n in heads)

    def stamps(self) -> list[torch.Tensor]:
        return [getattr(self, f"stamp{i}") for i in range(len(self.hidden))]

    def units(self, task: int) -> list[torch.Tensor]:
        """Indices of each hidden layer's units stamped <= ``task``, in their row order."""
        return [torch.nonzero(s <= task).flatten() for s in self.stamps()]

    def features(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Hidden features: of every unit, or (``task`` given) of the subnetwork of units stamped <= task.

        Timestamped inference computes with that subnetwork's weights gathered into dense tensors,
        not with later units silenced: growth appends rows and columns but leaves the gathered
        tensors (values and shapes) of earlier tasks unchanged, so task t's outputs after growth are
        the same computation as before it, on any machine.
        """
        return self._features(x, self.units(task) if task is not None else None)

    def _features(self, x: torch.Tensor, keep: list[torch.Tensor] | None) -> torch.Tensor:
        h = x if self.n_conv else x.flatten(1)
        prev = None  # indices of the previous layer's kept units (None: all inputs)
        for i, layer in enumerate(self.hidden):
            if keep is None:
                h = layer(h)
            else:
                w, b = layer.weight.index_select(0, keep[i]), layer.bias.index_select(0, keep[i])
                if prev is not None:
                    w = w.index_select(1, prev)
                h = layer._conv_forward(h, w, b) if isinstance(layer, nn.Conv2d) else F.linear(h, w, b)
                prev = keep[i]
            h = torch.relu(h)
            if i < self.n_conv and self._pool[i]:
                h = F.max_pool2d(h, 2)
            if i == self.n_conv - 1:
                h = h.mean((2, 3))
        return h

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        if task is None:
            h = self._features(x, None)
            return torch.cat([head(h) for head in self.heads], 1)
        keep = self.units(task)
        head = self.heads[task - 1]
        return F.linear(self._features(x, keep), head.weight.index_select(1, keep[-1]), head.bias)


@register_model("den_mlp", input_shape=lambda a: (a["in_chans"], a["image_size"], a["image_size"]))
def den_mlp(num_classes: int = 2, hidden: tuple[int, ...] = (312, 128), heads: tuple[int, ...] | None = None,
            in_chans: int = 1, image_size: int = 8) -> nn.Module:
    """DEN's MLP. ``heads`` lists each task's classes; without it, one head of ``num_classes``."""
    return DENNet((in_chans, image_size, image_size), tuple(hidden), _heads(heads, num_classes))


def _heads(heads, num_classes: int) -> tuple[int, ...]:
    return tuple(heads) if heads is not None else (num_classes,)


@register_model("den_conv", input_shape=lambda a: (a["in_chans"], a["image_size"], a["image_size"]))
def den_conv(num_classes: int = 2, channels: tuple[int, ...] = (16, 32), hidden: tuple[int, ...] = (),
             heads: tuple[int, ...] | None = None, in_chans: int = 1, image_size: int = 8) -> nn.Module:
    """DEN's conv variant: units are channels (3x3 convs, max-pool, global average pool), then Linear units."""
    if not channels:
        raise SlimkitError("den_conv needs at least one conv layer")
    return DENNet((in_chans, image_size, image_size), tuple(hidden), _heads(heads, num_classes), tuple(channels))
