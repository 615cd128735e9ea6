"""The epoch runner shared by train and merge, and each model source's input arguments.

Datasets: :mod:`slimkit.data.select`; run directory: :mod:`slimkit.engine.rundir`; DDP: :mod:`slimkit.engine.distributed`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from slimkit.engine.rundir import RunDir
from slimkit.models import model_params

__all__ = ["input_kwargs", "StopAfter", "run_epochs", "SMALL_NET_SIZE"]


SMALL_NET_SIZE = 16  # the built-in small nets' input side when --image-size is not given


def input_kwargs(arch: str, data: str, image_size: int | None) -> dict[str, Any]:
    """Input-related arguments of ``create_model``: the small nets' own ``in_chans``/``image_size``;
    for any other source (torchvision, timm, the user's own) ``input_shape`` 3 x S x S when the user
    chose a size S, else nothing (the source's default input, e.g. 3x224x224)."""
    params = model_params(arch)
    kwargs: dict[str, Any] = {}
    if "image_size" in params:
        if "in_chans" in params:
            kwargs.update(in_chans=1 if data == "digits" else 3)
        kwargs.update(image_size=image_size or SMALL_NET_SIZE)
    elif image_size is not None:
        kwargs.update(input_shape=(3, image_size, image_size))
    return kwargs


class StopAfter:
    """Simulated crash for resume tests: ``tick()`` is true once ``n`` epochs have run (never if None)."""

    def __init__(self, n: int | None):
        self.n, self.done = n, 0

    def tick(self) -> bool:
        self.done += 1
        return self.n is not None and self.done >= self.n


def run_epochs(*, net: torch.nn.Module, model: torch.nn.Module, train: Dataset, test: Dataset, opt, cfg,
               phase: str, start: int, run: RunDir, progress: bool, eval_every: int,
               state: Callable[[int], dict[str, Any]], augment=None, extra_loss=None,
               on_epoch: Callable[[int, dict[str, Any]], None] | None = None, stop: StopAfter | None = None,
               generation: int = 1, device: str = "cpu") -> bool:
    """Train epochs ``start..cfg.epochs-1`` of one phase; rank 0 logs to ``run`` and saves its state after each.

    ``net`` is what trains (possibly DDP-wrapped), ``model`` what is evaluated. ``state(epochs_done)``
    gives what state.pt holds after an epoch. Returns False when ``stop`` ended the run early.
    """
    import time

    from slimkit.engine.evaluate import accuracy
    from slimkit.engine.loop import train_one_epoch

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        stats = train_one_epoch(net, train, opt, cfg, generation, epoch, augment=augment, progress=progress,
                                desc=phase, extra_loss=extra_loss, device=device)
        train_s = time.perf_counter() - t0
        record = {"kind": "epoch", "phase": phase, "epoch": epoch + 1, **stats}
        if on_epoch is not None:
            on_epoch(epoch, record)  # on every rank: it may change training state (merge's lambda)
        if run.main:
            if (epoch + 1) % eval_every == 0 or epoch + 1 == cfg.epochs:
                record["test_acc"] = accuracy(model, test, device=device)
            run.log({**record, "train_seconds": train_s, "seconds": time.perf_counter() - t0})
            run.save_state(state(epoch + 1))
        if stop is not None and stop.tick():
            return False
    return True
