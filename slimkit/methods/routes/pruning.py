"""`slimkit prune`: a trained network pruned to the KELS widths by an importance criterion, then
fine-tuned on the one epoch engine (the prune route).

The run is a training run (:func:`slimkit.engine.train.train`) whose network is the checkpoint cut by
:func:`slimkit.methods.routes.prune.prune`: the same run directory, resume, DDP, ``last.pt``,
``summary.md`` and ``curves.png`` as ``slimkit train``; ``--teacher`` distils into it the same way.
The cut is recomputed when a run resumes (it is deterministic: the taylor gradients come from the
same seeded batches) and the fine-tuned weights are loaded from the state. The checkpoint's file
hash is part of the run's settings, so a resume against a changed file is refused.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from slimkit.core.errors import SlimkitError
from slimkit.core.globalstate import keep_global_state
from slimkit.core.plan import check_split_rate
from slimkit.engine.distill import check_teacher
from slimkit.engine.loop import TrainConfig
from slimkit.engine.train import KD_TEMPERATURE, KD_WEIGHT, Network, TrainRunConfig, load_teacher, train
from slimkit.methods.routes.prune import CRITERIA, prune
from slimkit.models import spec_of

log = logging.getLogger("slimkit")

__all__ = ["PruneRunConfig", "prune_run", "FINETUNE"]

FINETUNE = {"epochs": 30, "lr": 0.01, "warmup_epochs": 1}  # fine-tuning a trained network: merge's defaults


@dataclasses.dataclass
class PruneRunConfig:
    ckpt: str  # the trained network (any checkpoint slimkit reads; arch etc. for plain state_dicts)
    split_rate: float = 0.5  # every layer keeps its KELS width ceil(sr * C)
    criterion: str = "l1"  # l1 | l2 | taylor (torch-pruning's importance) | kels (the prefix)
    data: str = "digits"
    train_per_class: int | None = None
    subset_seed: int = 0
    eval_every: int = 1
    augment: str = "auto"
    taylor_batches: int = 8  # labelled training batches whose gradients the taylor criterion reads
    arch: str | None = None  # how to read a plain state_dict (as extract reads it)
    num_classes: int | None = None
    model_args: dict[str, Any] | None = None
    input_shape: tuple[int, ...] | None = None
    ema: bool = False
    state_key: str | None = None
    teacher: str | None = None
    kd_weight: float = KD_WEIGHT
    kd_temperature: float = KD_TEMPERATURE
    finetune: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(**FINETUNE))

    def __post_init__(self):
        if isinstance(self.finetune, dict):
            self.finetune = TrainConfig(**self.finetune)
        if self.criterion not in CRITERIA:
            raise SlimkitError(f"unknown pruning criterion {self.criterion!r}; available: {', '.join(CRITERIA)}")
        self.split_rate = check_split_rate(self.split_rate)
        if int(self.taylor_batches) < 1:
            raise SlimkitError(f"taylor_batches must be a positive integer, got {self.taylor_batches!r}")
        if self.input_shape is not None:
            self.input_shape = tuple(int(v) for v in self.input_shape)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _taylor_batches(train_set: Dataset, batch_size: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of training items in a seeded order (as the training set gives them)."""
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = []
    for i in range(0, min(len(order), count * batch_size), batch_size):
        items = [train_set[j] for j in order[i:i + batch_size]]
        batches.append((torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])))
    return batches


def _outputs(model: nn.Module, shape: tuple[int, ...]) -> int:
    from slimkit.core.cost import example_input

    with torch.inference_mode():
        return int(model.eval()(example_input(model, shape)).shape[-1])


def prune_run(cfg: PruneRunConfig, out: str | Path, resume: bool = False, progress: bool = True,
              echo: Callable[[str], None] = log.info, device: str = "auto", workers: int | None = None) -> dict[str, Any]:
    """Prune ``cfg.ckpt`` to the KELS widths of ``cfg.split_rate`` by ``cfg.criterion``, verify the cut
    against the masked network, fine-tune it ``cfg.finetune.epochs`` epochs on ``cfg.data`` and write
    the run directory ``out``; returns the final record (test accuracy, params). Torch's global
    generators, thread count and cudnn flags are left as they were."""
    with keep_global_state():  # building the checkpoint's network draws from the global generator
        return _prune_run(cfg, out, resume, progress, echo, device, workers)


def _prune_run(cfg: PruneRunConfig, out: str | Path, resume: bool, progress: bool, echo: Callable[[str], None],
               device: str, workers: int | None) -> dict[str, Any]:
    from slimkit.models.checkpoint import read

    src = read(cfg.ckpt, arch=cfg.arch, num_classes=cfg.num_classes, model_args=cfg.model_args,
               input_shape=cfg.input_shape, ema=cfg.ema, state_key=cfg.state_key)
    shape = tuple(spec_of(src.model).input_shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise SlimkitError(f"{cfg.ckpt} takes {'x'.join(map(str, shape))} inputs; fine-tuning resizes the data to "
                           "square C x S x S images, so prune needs a network with a square input")
    run_cfg = TrainRunConfig(arch=spec_of(src.model).arch, data=cfg.data, image_size=shape[1],
                             train_per_class=cfg.train_per_class, subset_seed=cfg.subset_seed,
                             eval_every=cfg.eval_every, augment=cfg.augment, teacher=cfg.teacher,
                             kd_weight=cfg.kd_weight, kd_temperature=cfg.kd_temperature, train=cfg.finetune)
    if run_cfg.teacher is not None:  # before the data is read and the network cut: the pruned one has the source's
        check_teacher(load_teacher(run_cfg.teacher), src.model, f"teacher {run_cfg.teacher}")  # input and classes
    config = {**cfg.to_json(), "ckpt": str(Path(cfg.ckpt).resolve()), "ckpt_sha256": src.sha256,
              "teacher": run_cfg.teacher}

    def build(classes: int, train_set: Dataset) -> nn.Module:
        have = _outputs(src.model, shape)
        if have != classes:
            raise SlimkitError(f"{cfg.ckpt} has {have} classes but {cfg.data} has {classes}; prune and fine-tune it "
                               "on the data it was trained for")
        batches = None
        if cfg.criterion == "taylor":
            batches = _taylor_batches(train_set, cfg.finetune.batch_size, cfg.taylor_batches, cfg.finetune.seed)
        echo(f"pruning {cfg.ckpt} to the KELS widths of split rate {cfg.split_rate:g} by {cfg.criterion} importance")
        return prune(src.model, cfg.split_rate, cfg.criterion, batches, input_shape=shape, seed=cfg.finetune.seed)

    name = f"{spec_of(src.model).arch} pruned by {cfg.criterion} to the KELS widths of {cfg.split_rate:g}"
    network = Network(shape, build, name,
                      meta={"pruned": {"criterion": cfg.criterion, "rate": cfg.split_rate, "source_sha256": src.sha256}})
    return train(run_cfg, out, resume=resume, progress=progress, echo=echo, device=device, workers=workers,
                 network=network, verb="prune", config=config)
