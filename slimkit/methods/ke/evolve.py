"""Knowledge Evolution (Taha et al., CVPR 2021): `slimkit evolve`.

The network N is split by a mask M into a fit hypothesis M*N and a reset hypothesis (1-M)*N.
Generation 1 trains N from scratch. Each later generation starts from the last-epoch weights of
the previous one, keeps the fit hypothesis, re-initialises the reset hypothesis like PyTorch's
default init (kaiming-uniform, a=sqrt(5)), carries BN parameters/statistics and biases over, and
trains the whole dense network again with a fresh optimizer and schedule. The mask never enters
the forward pass. After every generation both the dense network and its fit hypothesis are
evaluated (KELS: the physically extracted network; WELS: the masked network, which has no slim form).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.globalstate import keep_global_state, seed_global
from slimkit.core.graph import ChannelGraph, prunable_layers
from slimkit.core.plan import (
    apply_masks,
    check_split_rate,
    kels_plan,
    plan_masks,
    wels_masks,
)
from slimkit.core.surgery import apply_plan
from slimkit.data.augment import resolve_augment
from slimkit.data.loading import check_workers
from slimkit.data.select import datasets, num_classes_of
from slimkit.engine.distributed import barrier, ddp, process_group, resolve_device
from slimkit.engine.epochs import Phase, check_model_args, input_kwargs, log_epoch, run_phases
from slimkit.engine.evaluate import accuracy
from slimkit.engine.loop import Supervised, TrainConfig, make_optimizer, prepare_model
from slimkit.engine.rundir import RunDir
from slimkit.models import create_model, input_shape_of

log = logging.getLogger("slimkit")

__all__ = ["EvolveConfig", "evolve", "reinit_reset", "plot_generations"]


@dataclasses.dataclass
class EvolveConfig:
    arch: str = "cifar_resnet"  # registry name
    data: str = "digits"  # "digits" (bundled) or a dataset directory
    split_mode: str = "kels"  # "kels" (has a slim network) or "wels"
    split_rate: float = 0.5  # fraction of each layer in the fit hypothesis
    round_to: int = 1  # KELS widths rounded up to a multiple of this (1: the paper's ceil(sr*C))
    eval_every: int = 1  # evaluate dense and fit hypothesis every N epochs (and always at a generation's end)
    generations: int = 5  # N1..NG
    image_size: int | None = None  # square input side; None: 16 for the small nets, the source's own (e.g. 224) otherwise
    train_per_class: int | None = None  # seeded per-class subset of the training split (None: all)
    subset_seed: int = 0  # which subset (runs recorded before it existed drew it from train.seed)
    model_args: dict[str, Any] | None = None  # other constructor arguments of arch (e.g. depth, width)
    num_classes: int | None = None  # if given, the data must have exactly this many classes
    augment: str = "auto"  # training augmentation preset (slimkit.data.AUGMENTS); auto: shift below 64 px
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        resolve_augment(self.augment, int(self.image_size or 16))  # refuses an unknown preset
        if self.split_mode not in ("kels", "wels"):
            raise SlimkitError(f"unknown split mode {self.split_mode!r}; available: kels, wels")
        self.split_rate = check_split_rate(self.split_rate)
        if int(self.generations) < 1:
            raise SlimkitError(f"generations must be a positive integer, got {self.generations!r}")
        if self.train_per_class is not None and int(self.train_per_class) < 1:
            raise SlimkitError(f"train_per_class must be a positive integer, got {self.train_per_class!r}")
        if int(self.round_to) < 1 or int(self.eval_every) < 1:
            raise SlimkitError(f"round_to and eval_every must be positive integers, got {self.round_to!r}, {self.eval_every!r}")
        if self.round_to > 1 and self.split_mode != "kels":
            raise SlimkitError("round_to applies to KELS splits only")
        if self.image_size is not None and int(self.image_size) < 4:
            raise SlimkitError(f"image_size must be at least 4, got {self.image_size!r}")
        check_model_args(self.model_args)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@torch.no_grad()
def reinit_reset(model: nn.Module, masks: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """W = M*W + (1-M)*W_r with W_r drawn like PyTorch's default conv/linear init (kaiming-uniform, a=sqrt(5)).

    Only conv/linear weights change; BN parameters, running statistics and biases are carried over.
    """
    layers = prunable_layers(model)
    for name, mask in masks.items():
        w = layers[name].weight
        fresh = torch.empty(w.shape, dtype=w.dtype)  # drawn on the CPU: the same draw on every device
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        fresh = fresh.to(w.device)
        w.copy_(torch.where(mask.to(w.device), w, fresh))


def _model_kwargs(cfg: EvolveConfig) -> dict[str, Any]:
    return input_kwargs(cfg.arch, cfg.data, cfg.image_size, cfg.model_args)


def _build(cfg: EvolveConfig, num_classes: int, device: str) -> nn.Module:
    seed_global(cfg.train.seed, device)  # the initial weights are part of the seeded run
    return create_model(cfg.arch, num_classes=num_classes, **_model_kwargs(cfg))


def evolve(cfg: EvolveConfig, out: str | Path, resume: bool = False, progress: bool = True,
           echo: Callable[[str], None] = log.info, device: str = "auto", workers: int | None = None) -> list[dict[str, Any]]:
    """Run (or resume) Knowledge Evolution; returns one record per generation.

    Under torchrun (WORLD_SIZE > 1) the training steps run data-parallel (DDP, gloo on CPU); rank 0
    evaluates and writes every file. ``workers``: loader processes for image sets (None:
    slimkit.data.loading.default_workers()); results do not depend on it. Torch's global generators,
    thread count and cudnn flags are left as they were.
    """
    workers = check_workers(workers)
    with keep_global_state():
        device = resolve_device(device)  # before the group: the chosen device picks its backend
        with process_group(device) as (rank, world):
            return _evolve(cfg, Path(out), resume, progress and rank == 0, echo if rank == 0 else (lambda s: None),
                           rank, world, device, workers)


def _evolve(cfg: EvolveConfig, out: Path, resume: bool, progress: bool, echo: Callable[[str], None],
            rank: int, world: int, device: str = "cpu", workers: int = 0) -> list[dict[str, Any]]:
    # runs recorded before subset_seed existed drew the --train-per-class subset from the training seed
    run = RunDir(out, "evolve", cfg.to_json(), resume, main=rank == 0,
                 before={"subset_seed": cfg.train.seed, "model_args": None}).check()
    in_shape = input_shape_of(cfg.arch, **_model_kwargs(cfg))
    train, test = datasets(cfg.data, in_shape[0], in_shape[1], cfg.train_per_class, subset_seed=cfg.subset_seed,
                           augment=cfg.augment, workers=workers)
    num_classes = num_classes_of(train, test, cfg.num_classes)
    barrier(world)  # every rank has checked the directory and the data before rank 0 writes
    run.begin()
    model = _build(cfg, num_classes, device)
    shape = model.slimkit_spec.input_shape
    graph = ChannelGraph(model, shape)
    plan = kels_plan(graph, cfg.split_rate, cfg.round_to) if cfg.split_mode == "kels" else None
    masks = plan_masks(graph, plan) if plan is not None else wels_masks(model, cfg.split_rate, seed=cfg.train.seed)
    del graph
    tc = cfg.train

    gen, epoch_done, opt_state = 1, 0, None
    if run.state is not None:
        st = run.state
        model.load_state_dict(st["model"])
        gen, epoch_done, opt_state = int(st["generation"]), int(st["epochs_done"]), st["optimizer"]
        if gen > cfg.generations:
            echo(f"{out} is already complete ({cfg.generations} of {cfg.generations} generations); nothing to do")
        else:
            echo(f"resuming {out} at generation {gen}, epoch {epoch_done + 1}")
    records = run.records("generation")
    net = ddp(prepare_model(model, device), world)
    cur: dict[str, Any] = {}  # this generation's optimizer, start time and last epoch record

    def generation(g: int) -> Phase:
        def begin(done: int):
            cur.update(t0=time.perf_counter(), last={})  # a generation's last epoch is always evaluated
            if g > 1 and done == 0:  # a fresh generation: keep the fit hypothesis, redraw the rest
                reinit_reset(model, masks, torch.Generator().manual_seed(tc.seed * 7919 + g))
            cur["opt"] = opt = make_optimizer(net, tc)  # every generation starts with a fresh optimizer and schedule
            if done and opt_state is not None:  # resumed inside a generation: its optimizer as it was
                opt.load_state_dict(opt_state)
            return net, opt, Supervised(net, train, tc, g, train.batch_augment, progress, device)

        def end_epoch(epoch: int, record: dict[str, Any]) -> None:
            if run.main:
                cur["last"] = _log_epoch(cfg, model, masks, test, run, cur["opt"], g, epoch, record, device)

        def end() -> None:
            if run.main:
                records.append(_end_generation(cfg, model, plan, masks, test, run, g, cur, records, echo, train.preprocess,
                                               shape, device))
        return Phase(f"generation {g}", tc.epochs, begin, end_epoch, end)

    run_phases([generation(g) for g in range(1, cfg.generations + 1)], gen - 1, epoch_done)  # False: a test stopped it
    return records


def _end_generation(cfg: EvolveConfig, model: nn.Module, plan, masks, test, run: RunDir, gen: int, cur: dict[str, Any],
                    records: list[dict[str, Any]], echo, preprocess, shape, device: str) -> dict[str, Any]:
    """Rank 0 at a generation's end: dense and fit-hypothesis accuracy, checkpoint, summary, boundary state."""
    last = cur["last"]
    dense_acc = last["dense_acc"] if "dense_acc" in last else accuracy(model, test, device=device)
    if plan is not None:
        fit = prepare_model(apply_plan(_on_cpu(model), plan), device)  # surgery traces on the CPU
        fit_acc = accuracy(fit, test, device=device)
    else:
        fit_acc = accuracy(apply_masks(copy.deepcopy(model), masks), test, device=device)
    run.save_model(model, f"gen{gen}/last.pt", split=_split_meta(cfg),
                   metrics={"dense_test_acc": dense_acc, "fit_test_acc": fit_acc, "generation": gen},
                   data={"name": cfg.data, "image_size": shape[1], "in_chans": shape[0], "split_seed": 0,
                         "train_per_class": cfg.train_per_class, "subset_seed": cfg.subset_seed,
                         "preprocess": preprocess},
                   provenance={"recipe": "slimkit evolve", "config": cfg.to_json()})
    rec = {"kind": "generation", "generation": gen, "dense_acc": dense_acc, "fit_acc": fit_acc,
           "seconds": time.perf_counter() - cur["t0"]}
    run.log(rec)
    echo(f"generation {gen}/{cfg.generations}: dense {100 * dense_acc:.2f}%  fit hypothesis "
         f"({cfg.split_mode.upper()} {cfg.split_rate:g}) {100 * fit_acc:.2f}%  [{rec['seconds']:.1f} s]")
    _write_summary(run, cfg, [*records, rec])
    # the next generation starts with a fresh optimizer: no optimizer state crosses the boundary
    run.save_state({"generation": gen + 1, "epochs_done": 0, "model": model.state_dict(), "optimizer": None})
    return rec


def _log_epoch(cfg: EvolveConfig, model: nn.Module, masks: dict[str, torch.Tensor], test, run: RunDir, opt,
               gen: int, epoch: int, record: dict[str, Any], device: str) -> dict[str, Any]:
    """Rank 0 after an epoch: evaluate (every ``eval_every`` epochs), log, and save the resume state."""
    # per epoch the fit hypothesis is evaluated as the masked network: for KELS its outputs equal
    # the extracted network's (the surgery invariant) and it needs no tracing
    evaluate = None
    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.train.epochs:
        evaluate = lambda: dict(dense_acc=accuracy(model, test, device=device),  # noqa: E731
                                fit_acc=accuracy(apply_masks(copy.deepcopy(model), masks), test, device=device))
    return log_epoch(run, {"kind": "epoch", "generation": gen, "epoch": epoch + 1, **record}, evaluate,
                     lambda: {"generation": gen, "epochs_done": epoch + 1, "model": model.state_dict(),
                              "optimizer": opt.state_dict()})


def _on_cpu(model: nn.Module) -> nn.Module:
    """``model`` itself on the CPU, else a CPU copy in the standard memory format."""
    if next(model.parameters()).device.type == "cpu":
        return model
    return copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format)


def _split_meta(cfg: EvolveConfig) -> dict[str, Any]:
    meta = {"mode": cfg.split_mode, "rate": cfg.split_rate}
    if cfg.round_to > 1:
        meta["round_to"] = cfg.round_to
    return meta


def _write_summary(run: RunDir, cfg: EvolveConfig, records: list[dict[str, Any]]) -> None:
    lines = [f"# Knowledge Evolution: {cfg.arch} on {cfg.data}, {cfg.split_mode.upper()} split rate {cfg.split_rate:g}", "",
             f"{cfg.train.epochs} epochs per generation, loss {cfg.train.loss}, seed {cfg.train.seed}"
             + (f", {cfg.train_per_class} training images per class (subset seed {cfg.subset_seed})"
                if cfg.train_per_class else ""), "",
             "| generation | dense test acc | fit hypothesis test acc |", "|---:|---:|---:|"]
    lines += [f"| N{r['generation']} | {100 * r['dense_acc']:.2f}% | {100 * r['fit_acc']:.2f}% |" for r in records]
    run.write_text("summary.md", "\n".join(lines) + "\n")
    g = [r["generation"] for r in records]
    run.write_figure("generations.png", plot_generations(g, [100 * r["dense_acc"] for r in records],
                                                         [100 * r["fit_acc"] for r in records],
                                                         fit_label=f"fit hypothesis ({cfg.split_mode})"), dpi=120)


def plot_generations(generations: list[int], dense: list[float], fit: list[float],
                     dense_err: list[float] | None = None, fit_err: list[float] | None = None,
                     fit_label: str = "fit hypothesis"):
    """A figure of test accuracy (%) of the dense network and its fit hypothesis vs generation, with
    optional error bars."""
    from slimkit.core.plots import figure

    fig, ax = figure()
    ax.errorbar(generations, dense, dense_err, marker="o", capsize=3, label="dense")
    ax.errorbar(generations, fit, fit_err, marker="s", capsize=3, label=fit_label)
    ax.set_xlabel("generation")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(generations)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
