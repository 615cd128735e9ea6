"""`DENConfig`: the settings of a `slimkit den` run (DEN and the baselines trained beside it).

Its own module because both the sequence (sequence.py) and the baselines (baselines.py) read it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from slimkit.core.errors import SlimkitError

__all__ = ["DENConfig", "BASELINES"]


BASELINES = ("dnn", "dnn-l2", "ewc", "stl", "mtl")


@dataclasses.dataclass
class DENConfig:
    data: str = "digits"
    tasks: str = "split"
    hidden: tuple[int, ...] = (312, 128)  # Linear units per layer
    channels: tuple[int, ...] = ()  # conv channels before them (den_conv: units are channels); () = MLP
    image_size: int = 8
    train_per_class: int | None = None  # per-class subset of the training split, drawn from subset_seed (None: all)
    epochs: int = 30  # per task and phase (task 1, selective retraining, expansion, split retraining)
    lr: float = 0.05
    batch_size: int = 32
    l1: float = 3e-3  # mu: L1 (proximal) on task 1 and on new units (1e-2 starved one-vs-rest tasks)
    l1_head: float = 1e-2  # L1 on a new task's head while it alone trains: sparser heads select fewer units
    l2: float = 1e-4  # L2 of selective retraining
    # expand_on "val": after task t's step, expand when its accuracy on a held-out share of its training data
    # is more than tau_val below a network trained on task t alone (an STL reference, same images); "train":
    # the paper's rule, training loss after selective retraining above tau (it never fired on digits: small
    # sets are fitted to a loss ~1e-3 while the split cost task t 5-20 points, see results/claims_vs_data.md)
    expand_on: str = "val"
    val_fraction: float = 0.2  # share of every class of task t held out for the "val" decision (>= 1 image)
    tau_val: float = 0.02  # accuracy margin of the "val" rule
    tau: float = 0.05  # "train" rule: expand when task t's training loss after selective retraining exceeds tau
    k: int = 10  # units added per hidden layer on expansion
    group: float = 0.05  # gamma: group lasso on each new unit's incoming weights
    drift_lambda: float = 0.1  # lambda of ||W^t - W^{t-1}||^2 in the split retraining
    sigma: float = 0.2  # split units whose drift rho exceeds sigma (see benchmarks/results/den_digits.md)
    baselines: tuple[str, ...] = BASELINES
    l2_baseline: float = 0.01  # lambda of DNN-L2 (0.1 and 1 kept task 1 better but learned later tasks worse)
    ewc_lambda: float = 1e4  # lambda of EWC (100 left it equal to plain fine-tuning on digits)
    seed: int = 0
    subset_seed: int = 0  # which --train-per-class subset (runs recorded before it existed drew it from seed)

    def __post_init__(self):
        self.hidden = tuple(int(h) for h in self.hidden)
        self.channels = tuple(int(c) for c in self.channels)
        self.baselines = tuple(self.baselines)
        if not (self.hidden or self.channels) or any(h < 1 for h in self.hidden + self.channels):
            raise SlimkitError(f"layer widths must be positive integers, got {self.channels + self.hidden}")
        if self.train_per_class is not None and int(self.train_per_class) < 1:
            raise SlimkitError(f"train_per_class must be a positive integer, got {self.train_per_class!r}")
        for name in ("epochs", "batch_size", "k", "image_size"):
            if int(getattr(self, name)) < 1:
                raise SlimkitError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("lr",):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise SlimkitError(f"{name} must be a positive number, got {v!r}")
        for name in ("l1", "l1_head", "l2", "tau", "group", "drift_lambda", "sigma", "l2_baseline", "ewc_lambda", "tau_val"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise SlimkitError(f"{name} must be a non-negative number, got {v!r}")
        if self.expand_on not in ("val", "train"):
            raise SlimkitError(f"unknown expansion rule {self.expand_on!r}; available: val, train")
        if not 0 < self.val_fraction < 1:
            raise SlimkitError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise SlimkitError(f"unknown baseline {unknown[0]!r}; available: {', '.join(BASELINES)}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
