"""What every training verb shares: datasets, the run directory, metrics, resume checks (DDP: distributed.py).

A run directory holds ``config.json`` (the settings, compared on --resume), ``metrics.jsonl`` (one
JSON record per line), ``state.pt`` (everything needed to continue after the last finished epoch)
and the verb's checkpoints and reports.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, Subset

from slimkit.data import labels_of
from slimkit.errors import SlimkitError
from slimkit.fileio import atomic_write
from slimkit.models import model_params

__all__ = ["datasets", "per_class_subset", "shift_augment", "input_kwargs", "log_record", "read_records",
           "check_run_dir", "start_run_dir", "StopAfter", "run_epochs", "save_state", "load_state", "num_classes_of"]


def datasets(data: str, in_chans: int, image_size: int, train_per_class: int | None = None,
             subset_seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, test) for "digits" (bundled) or a dataset directory (ImageFolder or KE lists)."""
    from slimkit.data import digits, image_dir

    if data == "digits":
        train = digits("train", image_size=image_size, in_chans=in_chans, seed=0)
        test = digits("test", image_size=image_size, in_chans=in_chans, seed=0)
    else:
        shape = (in_chans, image_size, image_size)
        train, test = image_dir(data, shape, "train", augment=True), image_dir(data, shape, "test")
        tr_cls, te_cls = getattr(train, "classes", None), getattr(test, "classes", None)
        if tr_cls is not None and te_cls is not None and tr_cls != te_cls:
            # ImageFolder numbers each split's class folders on its own: they must be the same folders
            only = sorted(set(te_cls) ^ set(tr_cls))
            raise SlimkitError(f"{data}: the train and test splits have different class folders "
                               f"({len(tr_cls)} vs {len(te_cls)}; e.g. {only[0]!r} is in only one), so their "
                               "labels would not match; give both splits the same class folders")
    if train_per_class is not None:
        train = per_class_subset(train, train_per_class, subset_seed)
    return train, test


def num_classes_of(train: Dataset, test: Dataset, expected: int | None = None) -> int:
    """Classes of a dataset; refuses a training split that lacks some of the test split's classes, and
    a class count other than ``expected`` (the user's --num-classes) when one is given."""
    tr, te = labels_of(train).unique(), labels_of(test).unique()
    n = int(max(int(tr.max()), int(te.max()))) + 1
    if expected is not None and n != expected:
        raise SlimkitError(f"the data has {n} classes, {'fewer' if n < expected else 'more'} than "
                           f"--num-classes {expected}; check --data or drop --num-classes to use the data's count")
    missing = sorted(set(range(n)) - set(tr.tolist()))
    if missing:
        raise SlimkitError(f"the training split has no example of class {missing[0]} "
                           f"({len(missing)} of {n} classes missing); every class needs training data")
    return n


def per_class_subset(ds: Dataset, k: int, seed: int) -> Subset:
    """A seeded subset with at most ``k`` items of every class."""
    labels = labels_of(ds)
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        idx += members[torch.randperm(len(members), generator=g)[:k]].tolist()
    return Subset(ds, sorted(idx))


def shift_augment(x: torch.Tensor) -> torch.Tensor:
    """Random shifts of up to 1/8 of the image: the light augmentation for small digit images."""
    s = max(1, x.shape[-1] // 8)
    dx, dy = torch.randint(-s, s + 1, (2,)).tolist()
    return torch.roll(x, shifts=(dx, dy), dims=(2, 3))


def input_kwargs(arch: str, data: str, image_size: int) -> dict[str, Any]:
    """Input-related constructor arguments, for the small nets that take them."""
    params = model_params(arch)
    kwargs: dict[str, Any] = {}
    if "in_chans" in params:
        kwargs.update(in_chans=1 if data == "digits" else 3)
    if "image_size" in params:
        kwargs.update(image_size=image_size)
    return kwargs


def log_record(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def check_run_dir(out: Path, config: dict[str, Any], resume: bool, verb: str) -> None:
    """Check ``out`` for a new run (absent or empty) or a resume (same settings); writes nothing."""
    cfg_path, state_path = out / "config.json", out / "state.pt"
    if resume:
        if not cfg_path.is_file() or not state_path.is_file():
            raise SlimkitError(f"cannot resume: {out} holds no {verb} run (config.json and state.pt)")
        saved = json.loads(cfg_path.read_text())
        config = json.loads(json.dumps(config))  # as it was written: tuples read back as lists
        diff = [k for k in config if saved.get(k) != config[k]]
        if diff:
            k = diff[0]
            raise SlimkitError(f"cannot resume {out}: it was run with {k}={saved.get(k)!r}, now {k}={config[k]!r}; "
                               "resume with the same settings or choose a new --out")
        return
    if out.exists() and any(out.iterdir()):
        raise SlimkitError(f"output directory {out} is not empty; use --resume {out} to continue it or choose a new --out")
    if not out.parent.is_dir():
        raise SlimkitError(f"cannot create {out}: directory {out.parent} does not exist")


def start_run_dir(out: Path, config: dict[str, Any]) -> None:
    """Create ``out`` and record the settings (rank 0 only, after every rank has checked it)."""
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_state(out: Path, state: dict[str, Any]) -> None:
    atomic_write(out / "state.pt", lambda tmp: torch.save(state, tmp), force=True)


def load_state(out: Path) -> dict[str, Any]:
    return torch.load(out / "state.pt", map_location="cpu", weights_only=True)


class StopAfter:
    """Simulated crash for resume tests: ``tick()`` is true once ``n`` epochs have run (never if None)."""

    def __init__(self, n: int | None):
        self.n, self.done = n, 0

    def tick(self) -> bool:
        self.done += 1
        return self.n is not None and self.done >= self.n


def run_epochs(*, net: torch.nn.Module, model: torch.nn.Module, train: Dataset, test: Dataset, opt, cfg,
               phase: str, start: int, out: Path, main: bool, progress: bool, eval_every: int,
               state: Callable[[int], dict[str, Any]], augment=None, extra_loss=None,
               on_epoch: Callable[[int, dict[str, Any]], None] | None = None, stop: StopAfter | None = None,
               generation: int = 1, device: str = "cpu") -> bool:
    """Train epochs ``start..cfg.epochs-1`` of one phase, logging and checkpointing state after each.

    ``net`` is what trains (possibly DDP-wrapped), ``model`` what is evaluated. ``state(epochs_done)``
    gives what state.pt holds after an epoch. Returns False when ``stop`` ended the run early.
    """
    import time

    from slimkit.evaluate import accuracy
    from slimkit.training.loop import train_one_epoch

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        stats = train_one_epoch(net, train, opt, cfg, generation, epoch, augment=augment, progress=progress,
                                desc=phase, extra_loss=extra_loss, device=device)
        train_s = time.perf_counter() - t0
        record = {"kind": "epoch", "phase": phase, "epoch": epoch + 1, **stats}
        if on_epoch is not None:
            on_epoch(epoch, record)  # on every rank: it may change training state (merge's lambda)
        if main:
            if (epoch + 1) % eval_every == 0 or epoch + 1 == cfg.epochs:
                record["test_acc"] = accuracy(model, test, device=device)
            log_record(out / "metrics.jsonl", {**record, "train_seconds": train_s,
                                               "seconds": time.perf_counter() - t0})
            save_state(out, state(epoch + 1))
        if stop is not None and stop.tick():
            return False
    return True
