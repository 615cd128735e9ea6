"""The plain supervised step every classifier-training verb runs on the epoch engine: SGD, cosine
schedule with warm-up, per-epoch seeding, losses.

Every epoch seeds its own shuffling and augmentation from (seed, generation, epoch), so a run
resumed at an epoch boundary replays exactly what an uninterrupted run would have done.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from slimkit.core.errors import SlimkitError
from slimkit.core.globalstate import seed_global
from slimkit.data.loading import epoch_loader
from slimkit.engine.distill import kd_loss
from slimkit.engine.epochs import Hooks, Step, run_epoch
from slimkit.engine.evaluate import device_layout as _layout

__all__ = ["TrainConfig", "lr_at", "epoch_seed", "Supervised", "train_one_epoch", "LOSSES"]

LOSSES = ("ce", "smooth", "cskd")
CSKD_TEMPERATURE, CSKD_WEIGHT = 4.0, 1.0  # Yun et al., CVPR 2020


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 30  # epochs per generation (KE) or of the whole run
    batch_size: int = 64  # images per step
    lr: float = 0.05  # peak learning rate, reached after the warm-up
    momentum: float = 0.9  # SGD momentum, as in the KE paper
    weight_decay: float = 5e-4  # L2 on every parameter
    warmup_epochs: int = 5  # linear warm-up from lr/epochs... to lr, then cosine to 0
    loss: str = "ce"  # "ce" cross-entropy, "smooth" label smoothing 0.1, "cskd" class-wise self-distillation
    seed: int = 0  # seeds init, masks, shuffling and augmentation: same seed, same CPU run

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise SlimkitError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SlimkitError(f"lr must be a positive number, got {self.lr!r}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise SlimkitError("warmup_epochs and weight_decay must be >= 0 and momentum in [0, 1)")
        if self.loss not in LOSSES:
            raise SlimkitError(f"unknown loss {self.loss!r}; available: {', '.join(LOSSES)}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up over ``warmup_epochs`` (capped at half the run), then cosine decay to 0."""
    total = cfg.epochs * steps_per_epoch
    warm = min(cfg.warmup_epochs * steps_per_epoch, total // 2)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))


def epoch_seed(seed: int, generation: int, epoch: int) -> int:
    return (seed * 1_000_003 + generation * 10_007 + epoch) % (2**63)


def _smoothing(name: str) -> float:
    return 0.1 if name == "smooth" else 0.0


def _loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    smoothing = _smoothing(name)
    return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=smoothing)


class Supervised(Hooks):
    """The plain supervised step of every verb that trains a classifier (train, evolve, merge).

    Each epoch seeds its shuffling and augmentation from (seed, generation, epoch); the learning
    rate follows :func:`lr_at` (a parameter group with an ``lr_scale`` follows it scaled);
    ``extra_loss`` (e.g. merging's gate penalty) is added to every step's task loss. With a
    ``teacher`` (in eval mode, on the device) the task loss is knowledge distillation's
    (:func:`slimkit.engine.distill.kd_loss`, ``kd`` = (weight, temperature)) on the teacher's logits of
    the same augmented batch.
    """

    def __init__(self, model: nn.Module, dataset: Dataset, cfg: TrainConfig, generation: int = 1,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None, progress: bool = False,
                 device: str = "cpu", desc: str | None = None, extra_loss: Callable[[], torch.Tensor] | None = None,
                 teacher: nn.Module | None = None, kd: tuple[float, float] = (0.5, 4.0)):
        self.model, self.dataset, self.cfg, self.generation = model, dataset, cfg, generation
        self.augment, self.progress, self.device, self.desc, self.extra_loss = augment, progress, device, desc, extra_loss
        self.teacher, self.kd = teacher, kd
        self.loss_fn = _loss_fn(cfg.loss)
        self.pairs: _ClassPairs | None = None
        self.lr = cfg.lr

    def batches(self, epoch: int):
        seed = epoch_seed(self.cfg.seed, self.generation, epoch)
        seed_global(seed, self.device)  # batch augmentation draws from the global generator; per-item from (seed, item)
        loader = epoch_loader(self.dataset, self.cfg.batch_size, seed, self.device)  # DDP: this rank's shard
        self.pairs = _ClassPairs(self.dataset, seed) if self.cfg.loss == "cskd" else None
        if not self.progress:
            return loader
        from tqdm import tqdm

        return tqdm(loader, desc=f"{self.desc or f'gen {self.generation}'} epoch {epoch + 1}/{self.cfg.epochs}",
                    leave=False, unit="batch")

    def begin_step(self, opt, epoch: int, index: int, steps: int) -> None:
        self.lr = lr_at(self.cfg, epoch * steps + index, steps)
        for g in opt.param_groups:
            g["lr"] = self.lr * g.get("lr_scale", 1.0)

    def step(self, batch) -> Step:
        x, y = batch
        device, augment = self.device, self.augment
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if augment is not None:
            x = augment(x)
        with _autocast(device):
            if self.teacher is not None:
                logits = self.model(_layout(x, device))
                with torch.no_grad():
                    teacher_logits = self.teacher(_layout(x, device))
                loss = kd_loss(logits, teacher_logits, y, *self.kd, label_smoothing=_smoothing(self.cfg.loss))
            elif self.pairs is None:
                logits = self.model(_layout(x, device))
                loss = self.loss_fn(logits, y)
            else:
                x2 = self.pairs.partners(y).to(device)  # another image of the same class for every sample
                if augment is not None:
                    x2 = augment(x2)
                logits, logits2 = self.model(_layout(torch.cat([x, x2]), device)).split(len(y))
                loss = F.cross_entropy(logits, y) + cskd_term(logits, logits2.detach())
        if self.extra_loss is not None:
            loss = loss + self.extra_loss()
        return Step(loss, len(y), logits=logits, y=y)

    def epoch_stats(self) -> dict[str, float]:
        return {"lr": self.lr}


def train_one_epoch(model: nn.Module, dataset: Dataset, opt: torch.optim.Optimizer, cfg: TrainConfig,
                    generation: int, epoch: int, augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    progress: bool = False, device: str = "cpu", desc: str | None = None,
                    extra_loss: Callable[[], torch.Tensor] | None = None) -> dict[str, float]:
    """One epoch of :class:`Supervised` steps; returns mean loss, train accuracy and the last learning rate."""
    hooks = Supervised(model, dataset, cfg, generation, augment, progress, device, desc, extra_loss)
    return run_epoch(model, opt, hooks, epoch)


def _autocast(device: str):
    """bf16 autocast on CUDA (no loss scaling needed); nothing on CPU, which stays bit-reproducible."""
    import contextlib

    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: str) -> nn.Module:
    """Move ``model`` to ``device``; conv nets on CUDA take channels_last weights."""
    model.to(device)
    if str(device).startswith("cuda") and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    return model


def cskd_term(logits: torch.Tensor, partner_logits: torch.Tensor) -> torch.Tensor:
    """CS-KD regulariser: KL(softmax(partner/T) || softmax(logits/T)) * T^2, partner detached by the caller."""
    t = CSKD_TEMPERATURE
    return CSKD_WEIGHT * t * t * F.kl_div(F.log_softmax(logits / t, 1), F.softmax(partner_logits / t, 1),
                                          reduction="batchmean")


class _ClassPairs:
    """Draws, for each label, a random training item of the same class (seeded per epoch)."""

    def __init__(self, dataset: Dataset, seed: int):
        from slimkit.data.loading import labels_of

        self.dataset = dataset
        labels = labels_of(dataset)
        self.members = {int(c): torch.nonzero(labels == c).flatten() for c in labels.unique()}
        self.gen = torch.Generator().manual_seed(seed + 1)

    def partners(self, y: torch.Tensor) -> torch.Tensor:
        idx = [int(self.members[int(c)][torch.randint(len(self.members[int(c)]), (1,), generator=self.gen)])
               for c in y.cpu()]
        return torch.stack([self.dataset[i][0] for i in idx])


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """A fresh SGD optimizer: KE starts every generation with new momentum buffers."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class Optimizers:
    """Several optimizers stepped as one (merging: SGD for weights, Adam for gates)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        return {str(i): o.state_dict() for i, o in enumerate(self.optimizers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, o in enumerate(self.optimizers):
            o.load_state_dict(state[str(i)])
