"""Plain training from scratch: `slimkit train` (the teachers that merging starts from; the scratch and
distill routes with ``slim`` and ``teacher``), and the fine-tuning of any network a method hands it
(``network``: prune's pruned network).

The same loop, data and run directory as evolve: ``last.pt`` (a self-describing checkpoint),
``metrics.jsonl``, ``summary.md``, ``curves.png``, ``state.pt`` for --resume, DDP under torchrun.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.utils.data import Dataset

from slimkit.core.cost import count_params
from slimkit.core.errors import SlimkitError
from slimkit.core.globalstate import keep_global_state, seed_global
from slimkit.core.plan import check_split_rate
from slimkit.data.augment import resolve_augment
from slimkit.data.loading import check_workers
from slimkit.data.select import datasets, num_classes_of
from slimkit.engine.distill import check_kd_args, check_teacher
from slimkit.engine.distributed import barrier, ddp, process_group, resolve_device
from slimkit.engine.epochs import Phase, check_model_args, input_kwargs, log_epoch, run_phases
from slimkit.engine.evaluate import accuracy
from slimkit.engine.loop import Supervised, TrainConfig, make_optimizer, prepare_model
from slimkit.engine.rundir import RunDir
from slimkit.models import create_model, input_shape_of

log = logging.getLogger("slimkit")

__all__ = ["TrainRunConfig", "Network", "network_of", "train", "load_teacher", "plot_curves"]

KD_WEIGHT, KD_TEMPERATURE = 0.5, 4.0  # distillation's defaults (Hinton et al.'s soft/hard mix, a common T)
# settings added since runs were first recorded, and the value those older runs used
_BEFORE = {"model_args": None, "slim": None, "teacher": None, "kd_weight": KD_WEIGHT, "kd_temperature": KD_TEMPERATURE}


@dataclasses.dataclass
class TrainRunConfig:
    arch: str = "cifar_resnet"  # registry name
    data: str = "digits"  # "digits" (bundled) or a dataset directory
    image_size: int | None = None  # square input side; None: 16 for the small nets, the source's own (e.g. 224) otherwise
    train_per_class: int | None = None  # seeded per-class subset of the training split (None: all)
    subset_seed: int = 0  # which subset: fixed apart from --seed so teachers of one merge see the same data
    model_args: dict[str, Any] | None = None  # other constructor arguments of cfg.arch (e.g. depth, width)
    num_classes: int | None = None  # if given, the data must have exactly this many classes
    eval_every: int = 1  # evaluate on the test split every N epochs (and after the last)
    augment: str = "auto"  # training augmentation preset (slimkit.data.AUGMENTS); auto: shift below 64 px
    slim: float | None = None  # train the fit hypothesis's architecture: arch cut to its KELS widths at this rate
    teacher: str | None = None  # a trained network distilled into this one (its input and classes must match)
    kd_weight: float = KD_WEIGHT  # w of (1 - w) CE + w T^2 KL(teacher || student)
    kd_temperature: float = KD_TEMPERATURE  # T
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        if self.train_per_class is not None and int(self.train_per_class) < 1:
            raise SlimkitError(f"train_per_class must be a positive integer, got {self.train_per_class!r}")
        if int(self.eval_every) < 1:
            raise SlimkitError(f"eval_every must be a positive integer, got {self.eval_every!r}")
        if self.image_size is not None and int(self.image_size) < 4:
            raise SlimkitError(f"image_size must be at least 4, got {self.image_size!r}")
        resolve_augment(self.augment, int(self.image_size or 16))  # refuses an unknown preset
        check_model_args(self.model_args)
        if self.slim is not None:
            self.slim = check_split_rate(self.slim)
        self.kd_weight, self.kd_temperature = check_kd_args(self.kd_weight, self.kd_temperature)
        if self.teacher is not None:
            path = Path(self.teacher).expanduser()
            if not path.is_file():
                raise SlimkitError(f"teacher {self.teacher}: no such file")
            self.teacher = str(path.resolve())  # recorded absolute: a resume from another directory finds it
            if self.train.loss == "cskd":
                raise SlimkitError("--teacher distils another network's soft targets and --loss cskd the network's "
                                   "own (class-wise self-distillation); give one of them (--loss ce or smooth)")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Network:
    """What a training run trains: its input (C, H, W), ``build(classes, train_set)`` giving the network
    (called after the run's seed is set, before anything is written), and its name in the summary."""

    input_shape: tuple[int, ...]
    build: Callable[[int, Dataset], nn.Module]
    name: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra checkpoint metadata (e.g. split)


def network_of(cfg: TrainRunConfig) -> Network:
    """The network ``cfg`` names: ``cfg.arch`` with its input arguments, or with ``cfg.slim`` its
    fit hypothesis's architecture (the KELS widths), initialised afresh from the seed
    (:func:`slimkit.models.slimarch.slim_network`)."""
    kwargs = input_kwargs(cfg.arch, cfg.data, cfg.image_size, cfg.model_args)
    shape = input_shape_of(cfg.arch, **kwargs)
    if cfg.slim is None:
        return Network(shape, lambda classes, _train: create_model(cfg.arch, num_classes=classes, **kwargs), cfg.arch)

    def build(classes: int, _train: Dataset) -> nn.Module:
        import torch

        from slimkit.models.slimarch import slim_network

        args = dict(kwargs)
        given_shape = args.pop("input_shape", None)
        return slim_network(cfg.arch, cfg.slim, num_classes=classes, model_args=args, input_shape=given_shape,
                            generator=torch.Generator().manual_seed(cfg.train.seed))

    return Network(shape, build, f"{cfg.arch}, fit hypothesis architecture (KELS {cfg.slim:g})",
                   meta={"split": {"mode": "kels", "rate": cfg.slim}})


def train(cfg: TrainRunConfig, out: str | Path, resume: bool = False, progress: bool = True,
          echo: Callable[[str], None] = log.info, device: str = "auto", workers: int | None = None,
          network: Network | None = None, verb: str = "train", config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``cfg.arch`` (or ``network``) from a seeded random init; returns the final record (test accuracy, params).

    ``device``: cpu, cuda or auto; on CUDA the steps run under bf16 autocast with channels_last.
    ``workers``: loader processes for image sets (None: slimkit.data.loading.default_workers()); results do not depend on it.
    ``network``: train this instead of what ``cfg`` names (a method's network to fine-tune); ``verb`` and
    ``config`` (what a resume must match, default ``cfg.to_json()``) then name the method's run.
    Torch's global generators, thread count and cudnn flags are left as they were."""
    workers = check_workers(workers)
    with keep_global_state():
        device = resolve_device(device)  # before the group: the chosen device picks its backend
        with process_group(device) as (rank, world):
            return _train(cfg, Path(out), resume, progress and rank == 0, echo if rank == 0 else (lambda s: None),
                          rank, world, device, workers, network, verb, config)


def load_teacher(path: str) -> nn.Module:
    """The teacher network in ``path`` (a checkpoint slimkit reads by itself), frozen, in eval mode."""
    from slimkit.models.checkpoint import load

    try:
        teacher = load(path)
    except SlimkitError as exc:
        raise SlimkitError(f"teacher {path}: {exc}") from exc
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def _train(cfg: TrainRunConfig, out: Path, resume: bool, progress: bool, echo,
           rank: int, world: int, device: str, workers: int = 0, network: Network | None = None,
           verb: str = "train", config: dict[str, Any] | None = None) -> dict[str, Any]:
    run = RunDir(out, verb, config if config is not None else cfg.to_json(), resume, main=rank == 0,
                 before=_BEFORE).check()
    net_src = network if network is not None else network_of(cfg)
    shape = net_src.input_shape
    train_ds, test = datasets(cfg.data, shape[0], shape[1], cfg.train_per_class, cfg.subset_seed, cfg.augment, workers)
    classes = num_classes_of(train_ds, test, cfg.num_classes)
    teacher = load_teacher(cfg.teacher) if cfg.teacher is not None else None
    seed_global(cfg.train.seed, device)  # the initial weights are part of the seeded run
    model = net_src.build(classes, train_ds)
    if teacher is not None:
        check_teacher(teacher, model, f"teacher {cfg.teacher}")
        teacher = prepare_model(teacher, device)
    barrier(world)  # every rank has checked the directory and the data before rank 0 writes
    run.begin()
    net = ddp(prepare_model(model, device), world)
    opt = make_optimizer(net, cfg.train)
    start = 0
    if run.state is not None:
        model.load_state_dict(run.state["model"])
        opt.load_state_dict(run.state["optimizer"])
        start = int(run.state["epochs_done"])
        echo(f"{out} has run all {start} epochs; writing its outputs again from state.pt" if start >= cfg.train.epochs
             else f"resuming {out} at epoch {start + 1}")
    hooks = Supervised(net, train_ds, cfg.train, augment=train_ds.batch_augment, progress=progress, device=device,
                       desc=verb, teacher=teacher, kd=(cfg.kd_weight, cfg.kd_temperature))

    def end_epoch(epoch: int, record: dict[str, Any]) -> None:
        if run.main:
            evaluate = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.train.epochs
            log_epoch(run, {"kind": "epoch", "phase": "train", "epoch": epoch + 1, **record},
                      (lambda: {"test_acc": accuracy(model, test, device=device)}) if evaluate else None,
                      lambda: {"epochs_done": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict()})

    finished = run_phases([Phase("train", cfg.train.epochs, lambda done: (net, opt, hooks), end_epoch)], done=start)
    if not finished or not run.main:
        return {}
    acc = accuracy(model, test, device=device)
    run.save_model(model, "last.pt", metrics={"test_acc": acc, "epochs": cfg.train.epochs}, **net_src.meta,
                   data={"name": cfg.data, "image_size": shape[1], "in_chans": shape[0], "split_seed": 0,
                         "train_per_class": cfg.train_per_class, "subset_seed": cfg.subset_seed,
                         "preprocess": train_ds.preprocess},
                   provenance={"recipe": f"slimkit {verb}", "config": config if config is not None else cfg.to_json()})
    params = count_params(model)
    kd = (f", distilled from {cfg.teacher} (weight {cfg.kd_weight:g}, temperature {cfg.kd_temperature:g})"
          if cfg.teacher else "")
    run.write_text("summary.md",
        f"# {net_src.name} trained on {cfg.data}\n\n"
        f"{cfg.train.epochs} epochs, loss {cfg.train.loss}{kd}, lr {cfg.train.lr:g}, seed {cfg.train.seed}"
        + (f", {cfg.train_per_class} training images per class (subset seed {cfg.subset_seed})" if cfg.train_per_class else "")
        + f"\n\n| test accuracy | parameters |\n|---:|---:|\n| {100 * acc:.2f}% | {params:,} |\n")
    run.write_figure("curves.png", plot_curves(run.records("epoch"), title=f"{net_src.name} on {cfg.data}"))
    echo(f"trained {net_src.name} for {cfg.train.epochs} epochs: test accuracy {100 * acc:.2f}%  -> {out / 'last.pt'}")
    return {"test_acc": acc, "params": params}


def plot_curves(records: list[dict[str, Any]], title: str = ""):
    """A figure of training loss and test accuracy against epoch (one line per phase)."""
    from slimkit.core.plots import figure

    fig, (ax1, ax2) = figure(1, 2, size=(9, 3.4))
    phases = list(dict.fromkeys(r.get("phase", "train") for r in records))
    offset = 0
    for ph in phases:
        rs = [r for r in records if r.get("phase", "train") == ph]
        ax1.plot([offset + r["epoch"] for r in rs], [r["loss"] for r in rs], label=ph)
        ev = [r for r in rs if "test_acc" in r]
        ax2.plot([offset + r["epoch"] for r in ev], [100 * r["test_acc"] for r in ev], marker=".", label=ph)
        offset += max((r["epoch"] for r in rs), default=0)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy (%)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if len(phases) > 1:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
