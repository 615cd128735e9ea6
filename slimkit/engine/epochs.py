"""The one epoch engine every training verb runs on, and each model source's input arguments.

Two levels, each with the per-method parts as hooks:

- :func:`run_epoch` / :func:`run_epochs`: the steps of an epoch. Every step is the same sequence:
  ``hooks.begin_step`` (learning rate), ``hooks.step`` (what the step computes: forward, task loss,
  extra loss), zero_grad, backward, ``hooks.before_update`` (gradient masks, clipping, checks),
  ``optimizer.step()``, ``hooks.after_update`` (proximal updates), then the epoch's mean loss and
  accuracy. :class:`slimkit.engine.loop.Supervised` is the plain loop (train, evolve, merge);
  :class:`slimkit.methods.den.fit.MaskedProximal` is DEN's masked step with its proximal
  L1 / group-lasso updates: they act on the weights *after* the optimizer step, so they are a hook
  (``after_update``) rather than part of a loss, and the gradient masks act between backward and the
  step (``before_update``); DEN's baseline MTL sums one batch of every task per step (its own ``step``).
- :func:`run_phases`: a run directory's epochs, split into :class:`Phase` s with one optimizer and
  one schedule each (train: one; evolve: one per generation; merge: gates, then fine-tuning). A
  phase builds what trains (``begin``, given the epochs already done when resumed inside it),
  evaluates/logs/saves after each epoch (``end_epoch``) and acts at its boundary (``end``:
  evolve's generation checkpoint, merge's compression). Every epoch is a resume point, where a test
  may stop the run (:func:`slimkit.engine.testhooks.stop_after`). DEN's resume points are whole tasks
  and baselines (it keeps no per-epoch state), so its sequence calls :func:`run_epochs` per fit and
  saves its state itself.

Datasets: :mod:`slimkit.data.select`; run directory: :mod:`slimkit.engine.rundir`; DDP: :mod:`slimkit.engine.distributed`.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Sequence

import torch

from slimkit.core.errors import SlimkitError
from slimkit.engine.testhooks import active as _test_hook
from slimkit.models import model_params

__all__ = ["input_kwargs", "check_model_args", "SMALL_NET_SIZE", "Step", "Hooks", "run_epoch", "run_epochs", "Phase",
           "run_phases", "log_epoch"]


SMALL_NET_SIZE = 16  # the built-in small nets' input side when --image-size is not given


def input_kwargs(arch: str, data: str, image_size: int | None,
                 model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The arguments of ``create_model`` other than ``num_classes``: the small nets' own ``in_chans``/
    ``image_size``; for any other source (torchvision, timm, the user's own) ``input_shape`` 3 x S x S
    when the user chose a size S, else nothing (the source's default input, e.g. 3x224x224); then the
    user's ``model_args`` (--model-args, e.g. depth=56,width=32), which win over the input defaults."""
    params = model_params(arch)
    kwargs: dict[str, Any] = {}
    if "image_size" in params:
        if "in_chans" in params:
            kwargs.update(in_chans=1 if data == "digits" else 3)
        kwargs.update(image_size=image_size or SMALL_NET_SIZE)
    elif image_size is not None:
        kwargs.update(input_shape=(3, image_size, image_size))
    return {**kwargs, **check_model_args(model_args)}


def check_model_args(model_args: dict[str, Any] | None) -> dict[str, Any]:
    """--model-args of a training run: a dict of constructor arguments other than num_classes."""
    if model_args is None:
        return {}
    if not isinstance(model_args, dict) or not all(isinstance(k, str) for k in model_args):
        raise SlimkitError(f"model_args must be a dict of constructor arguments, got {model_args!r}")
    if "num_classes" in model_args:
        raise SlimkitError("give the class count with --num-classes, not --model-args")
    return dict(model_args)


# --- the steps of an epoch --------------------------------------------------------------------------

@dataclasses.dataclass
class Step:
    """What one step computed: ``loss`` is differentiated; ``reported`` (default ``loss``) enters the
    epoch's mean loss, weighted by ``n`` items; with ``logits`` and ``y`` the epoch counts accuracy."""

    loss: torch.Tensor
    n: int
    reported: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    y: torch.Tensor | None = None


class Hooks:
    """The per-method parts of an epoch; only :meth:`batches` and :meth:`step` have no default."""

    def batches(self, epoch: int) -> Iterable[Any]:
        """The epoch's batches, in their seeded order."""
        raise NotImplementedError

    def begin_step(self, opt, epoch: int, index: int, steps: int) -> None:
        """Before step ``index`` of ``steps`` (e.g. set ``opt``'s learning rate)."""

    def step(self, batch: Any) -> Step:
        """Forward and loss of one batch."""
        raise NotImplementedError

    def before_update(self, step: Step) -> None:
        """After backward, before the optimizer step (gradient masks, clipping, divergence checks)."""

    def after_update(self) -> None:
        """After the optimizer step (proximal updates)."""

    def epoch_stats(self) -> dict[str, Any]:
        """Extra entries of the epoch's record (e.g. the last learning rate)."""
        return {}


def run_epoch(net: torch.nn.Module, opt, hooks: Hooks, epoch: int) -> dict[str, Any]:
    """One epoch of ``hooks``' steps on ``net`` (put in training mode); returns the mean ``loss`` (over
    items), ``train_acc`` when the steps give logits, and ``hooks.epoch_stats()``."""
    net.train()
    total_loss = correct = seen = 0
    counted = False
    batches = hooks.batches(epoch)
    steps = len(batches) if hasattr(batches, "__len__") else 0
    for i, batch in enumerate(batches):
        hooks.begin_step(opt, epoch, i, steps)
        out = hooks.step(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        hooks.before_update(out)
        opt.step()
        hooks.after_update()
        total_loss += float((out.loss if out.reported is None else out.reported).detach()) * out.n
        if out.logits is not None:
            counted = True
            correct += int((out.logits.argmax(1) == out.y).sum())
        seen += out.n
    stats: dict[str, Any] = {"loss": total_loss / max(seen, 1)}
    if counted:
        stats["train_acc"] = correct / max(seen, 1)
    return {**stats, **hooks.epoch_stats()}


def run_epochs(net: torch.nn.Module, opt, hooks: Hooks, epochs: Iterable[int],
               end_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """:func:`run_epoch` for each epoch in ``epochs``, calling ``end_epoch(epoch, stats)`` after each;
    returns the last epoch's stats (``{}`` when there was none)."""
    stats: dict[str, Any] = {}
    for epoch in epochs:
        stats = run_epoch(net, opt, hooks, epoch)
        if end_epoch is not None:
            end_epoch(epoch, stats)
    return stats


# --- a run directory's phases ---------------------------------------------------------------------

@dataclasses.dataclass
class Phase:
    """A stretch of ``epochs`` epochs with one optimizer and one schedule.

    ``begin(done)`` returns ``(net, optimizer, hooks)``; ``done`` is the number of this phase's epochs
    already run (non-zero only when resumed inside it). ``end_epoch(epoch, record)`` runs on every
    rank after each epoch, with the epoch's stats and its training seconds in ``record``; ``end()``
    after the phase's last epoch.
    """

    name: str
    epochs: int
    begin: Callable[[int], tuple[torch.nn.Module, Any, Hooks]]
    end_epoch: Callable[[int, dict[str, Any]], None]
    end: Callable[[], None] | None = None


def run_phases(phases: Sequence[Phase], first: int = 0, done: int = 0) -> bool:
    """Run ``phases[first:]``, the first of them from epoch ``done``. Returns False when a test hook
    stopped the run at a resume point (:func:`slimkit.engine.testhooks.stop_after`)."""
    hook = _test_hook()
    for i in range(first, len(phases)):
        phase = phases[i]
        start = done if i == first else 0
        net, opt, hooks = phase.begin(start)
        for epoch in range(start, phase.epochs):
            t0 = time.perf_counter()
            stats = run_epoch(net, opt, hooks, epoch)
            phase.end_epoch(epoch, {**stats, "train_seconds": time.perf_counter() - t0})
            if hook is not None and hook.passed_point():
                return False
        if phase.end is not None:
            phase.end()
    return True


def log_epoch(run, record: dict[str, Any], evaluate: Callable[[], dict[str, Any]] | None,
              state: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Rank 0 after an epoch: ``record`` (with the ``train_seconds`` :func:`run_phases` measured) plus
    ``evaluate()`` when given, logged with the epoch's seconds; then the resume state. Returns the
    record without timings."""
    t0 = time.perf_counter()
    train_s = record.pop("train_seconds")
    if evaluate is not None:
        record.update(evaluate())
    run.log({**record, "train_seconds": train_s, "seconds": train_s + time.perf_counter() - t0})
    run.save_state(state())
    return record
