"""DEN's training step on the epoch engine: SGD on chosen weight entries only, with DEN's penalties.

:func:`train_task` runs :class:`MaskedProximal` on :func:`slimkit.engine.epochs.run_epochs`. The
engine's step is the plain one; DEN's parts are hooks:

- ``step``: the task loss of head ``task`` (timestamped forward) plus the smooth penalties (L2,
  L2 to reference weights, EWC), which enter the gradient;
- ``before_update``: gradient masks (entries outside the masks never change), a divergence check
  and a gradient-norm clip;
- ``after_update``: L1 and group lasso as proximal steps on the weights *after* the optimizer step
  (soft-thresholding reaches exact zeros, which a gradient step would only approach), so they are
  an update hook, not part of the loss.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from slimkit.core.errors import SlimkitError
from slimkit.engine.epochs import Hooks, Step, run_epochs
from slimkit.models.den_net import DENNet

__all__ = ["CLIP", "Penalties", "MaskedProximal", "train_task", "task_loss"]

CLIP = 5.0  # gradient-norm clip of every DEN training step


@dataclasses.dataclass
class Penalties:
    l1: float = 0.0  # proximal soft-threshold on the trainable weights (hidden layers and heads)
    l2: float = 0.0  # l2 * ||W||^2 on the trainable hidden weights
    l2_to: float = 0.0  # l2_to * ||W - W_ref||^2 (weights and biases) on the trainable entries the reference has
    group: float = 0.0  # proximal group lasso on the incoming rows of units stamped `task`
    ewc: float = 0.0  # ewc/2 * sum F (W - W_ref)^2 (elastic weight consolidation baseline)
    ref: Mapping[str, torch.Tensor] | None = None
    fisher: Mapping[str, torch.Tensor] | None = None


class MaskedProximal(Hooks):
    """Hooks of one DEN fit: batches shuffled by an owned generator, masked gradients, proximal updates."""

    def __init__(self, net: DENNet, task: int, data: Dataset, masks: Mapping[str, torch.Tensor | None],
                 train: dict[str, torch.nn.Parameter], lr: float, batch_size: int, pen: Penalties, seed: int):
        self.net, self.task, self.data, self.masks, self.train = net, task, data, masks, train
        self.lr, self.batch_size, self.pen = lr, batch_size, pen
        self.gen = torch.Generator().manual_seed(seed)
        self.dev = next(net.parameters()).device  # batches go where the network is
        self.hidden_w = [n for n in train if n.startswith("hidden.") and n.endswith(".weight")]
        self.hidden_all = [n for n in train if n.startswith("hidden.")]
        self.l1_names = [n for n in train if n.endswith(".weight")]  # L1 reaches the heads too (a sparse head selects)

    def batches(self, epoch: int):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True, generator=self.gen)

    def step(self, batch) -> Step:
        pen, train, masks = self.pen, self.train, self.masks
        x, y = batch
        x, y = x.to(self.dev), y.to(self.dev)
        loss = F.cross_entropy(self.net(x, self.task), y)
        reg = loss
        for n in self.hidden_w if pen.l2 else ():
            w, m = train[n], masks[n]
            reg = reg + pen.l2 * ((w if m is None else w * m) ** 2).sum()
        for n in self.hidden_all if (pen.l2_to or pen.ewc) and pen.ref is not None else ():
            # weights *and* biases: anchoring only the weights lets the biases drift instead
            if n not in pen.ref:
                continue
            r, m = pen.ref[n], masks[n]
            old = tuple(slice(0, k) for k in r.shape)  # the entries that existed in the reference
            d = train[n][old] - r
            if m is not None:
                d = d * m[old]
            if pen.l2_to:
                reg = reg + pen.l2_to * (d ** 2).sum()
            if pen.ewc and pen.fisher is not None and n in pen.fisher:
                reg = reg + 0.5 * pen.ewc * (pen.fisher[n] * d ** 2).sum()
        return Step(reg, len(y), reported=loss)

    def before_update(self, step: Step) -> None:
        for n, p in self.train.items():
            if self.masks[n] is not None and p.grad is not None:
                p.grad.mul_(self.masks[n].to(p.grad.dtype))
        if not torch.isfinite(step.loss):
            raise SlimkitError(f"training task {self.task} diverged (loss {float(step.loss)}); lower --lr")
        # a step of at most norm CLIP: one-vs-rest digits diverged to NaN without it (seed 2, task 9)
        torch.nn.utils.clip_grad_norm_(list(self.train.values()), CLIP)

    @torch.no_grad()
    def after_update(self) -> None:
        pen, train, masks, lr, task = self.pen, self.train, self.masks, self.lr, self.task
        for n in self.l1_names if pen.l1 else ():
            w, m = train[n], masks[n]
            shrunk = torch.sign(w) * (w.abs() - lr * pen.l1).clamp_min(0)
            w.copy_(shrunk if m is None else torch.where(m, shrunk, w))
        for n in self.hidden_w if pen.group else ():
            w, i = train[n], int(n.split(".")[1])
            rows = self.net.stamps()[i] == task
            norms = w[rows].flatten(1).norm(dim=1)
            scale = (1 - lr * pen.group / norms.clamp_min(1e-12)).clamp_min(0)
            w[rows] = w[rows] * scale.view(-1, *([1] * (w.dim() - 1)))
            b = train.get(f"hidden.{i}.bias")
            if b is not None:  # a unit whose group is zero outputs nothing: its bias goes too
                b[rows] = torch.where(scale.flatten() == 0, torch.zeros_like(b[rows]), b[rows])


def train_task(net: DENNet, task: int, data: Dataset, masks: Mapping[str, torch.Tensor | None], epochs: int,
               lr: float = 0.01, batch_size: int = 32, penalties: Penalties | None = None, seed: int = 0) -> float:
    """Train head ``task`` (timestamped forward) changing only the entries ``masks`` allow.

    A mask of None frees the whole parameter; parameters not named stay frozen. Returns the mean
    training loss of the last epoch (task loss only)."""
    params = dict(net.named_parameters())
    train = {n: params[n] for n in masks}
    for p in net.parameters():
        p.requires_grad_(False)
    for p in train.values():
        p.requires_grad_(True)
    opt = torch.optim.SGD(list(train.values()), lr=lr, momentum=0.9)
    hooks = MaskedProximal(net, task, data, masks, train, lr, batch_size, penalties or Penalties(), seed)
    try:
        return run_epochs(net, opt, hooks, range(epochs)).get("loss", float("nan"))
    finally:
        for p in net.parameters():
            p.requires_grad_(True)
        net.eval()


@torch.no_grad()
def task_loss(net: DENNet, task: int, data: Dataset) -> float:
    """Mean cross-entropy of head ``task`` on ``data`` (eval mode)."""
    net.eval()
    dev = next(net.parameters()).device
    total = seen = 0
    for x, y in DataLoader(data, batch_size=512):
        total += float(F.cross_entropy(net(x.to(dev), task), y.to(dev), reduction="sum"))
        seen += len(y)
    return total / max(seen, 1)
