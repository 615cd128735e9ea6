"""Merging two teachers into one network of their size: `slimkit merge` (Pasen & Boza, arXiv 2204.09973).

1. big student = the teachers concatenated (transform.py); its logits are the mean of theirs;
2. importance learning: hard-concrete L0 gates on every channel group, loss = task loss +
   lambda * sum_groups (1/2 - mean P(gate open))^2, lambda += step * sqrt(lambda) after every epoch;
   weights train with SGD, gates with Adam in their own group (no weight decay);
3. compression: per group keep the half with the largest log alpha (a KeepPlan) and cut with the one
   surgery, giving exactly the teachers' architecture;
4. fine-tuning with the normal loop.

The run directory holds big.pt, compressed.pt, last.pt (fine-tuned), metrics.jsonl, summary.md,
gates.png (open-gate fraction per layer over the gate epochs), curves.png, and state.pt for --resume.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimkit.core.cost import count_params
from slimkit.core.errors import SlimkitError
from slimkit.data.select import datasets, num_classes_of
from slimkit.engine.distributed import barrier, ddp, process_group, resolve_device
from slimkit.engine.epochs import StopAfter, run_epochs
from slimkit.engine.evaluate import accuracy
from slimkit.engine.loop import Optimizers, TrainConfig, make_optimizer, prepare_model
from slimkit.engine.rundir import RunDir

log = logging.getLogger("slimkit")

__all__ = ["MergeConfig", "merge", "plot_gates"]


@dataclasses.dataclass
class MergeConfig:
    data: str = "digits"  # "digits" (bundled) or a dataset directory, as the teachers were trained on
    train_per_class: int | None = None  # seeded per-class subset of the training split (None: all)
    subset_seed: int = 0  # the subset the teachers saw (slimkit train --subset-seed)
    # the weights are trained already: a small SGD rate while the gates learn, and a fast Adam rate for
    # log alpha so the task loss can separate the channels before the penalty pins the mean open
    # fraction at 1/2 (gate_lr 0.05 left every gate equal and the student collapsed; see benchmarks/README.md)
    gate: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(epochs=30, lr=0.01, batch_size=32))
    finetune: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(epochs=30, lr=0.01, warmup_epochs=1, batch_size=32))
    gate_lr: float = 0.5  # Adam learning rate of log alpha (follows the weights' schedule shape)
    lambda_init: float = 1.0  # weight of the half-open penalty in the first gate epoch
    lambda_step: float = 1.0  # after every gate epoch: lambda += lambda_step * sqrt(lambda)
    eval_every: int = 1
    augment: str = "auto"  # training augmentation preset (slimkit.data.AUGMENTS); auto: shift below 64 px

    def __post_init__(self):
        from slimkit.data.augment import AUGMENTS

        if self.augment != "auto" and self.augment not in AUGMENTS:
            raise SlimkitError(f"unknown --augment preset {self.augment!r}; available: auto, {', '.join(AUGMENTS)}")
        for name in ("gate", "finetune"):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, TrainConfig(**getattr(self, name)))
        if self.train_per_class is not None and int(self.train_per_class) < 1:
            raise SlimkitError(f"train_per_class must be a positive integer, got {self.train_per_class!r}")
        for name in ("gate_lr", "lambda_init"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise SlimkitError(f"{name} must be a positive number, got {v!r}")
        if not (self.lambda_step >= 0 and math.isfinite(self.lambda_step)):
            raise SlimkitError(f"lambda_step must be a non-negative number, got {self.lambda_step!r}")
        if int(self.eval_every) < 1:
            raise SlimkitError(f"eval_every must be a positive integer, got {self.eval_every!r}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _read_teachers(teachers: list, arch: str | None, num_classes: int | None, ema: bool = False,
                   state_key: str | None = None):
    """The two teachers: checkpoint paths, or networks slimkit created (``nn.Module`` objects)."""
    from slimkit.core.checkpoint import source

    if len(teachers) != 2:
        raise SlimkitError(f"merge takes exactly two teacher checkpoints, got {len(teachers)}")
    a, b = teachers
    objects = [isinstance(t, nn.Module) for t in teachers]
    if a is b or (not any(objects) and Path(a).resolve() == Path(b).resolve()):
        raise SlimkitError(f"both teachers are {a if not objects[0] else 'the same network'}; merging needs two "
                           "independently trained networks")
    return [source(t, arch=arch, num_classes=num_classes, ema=ema, state_key=state_key) for t in teachers]


def merge(cfg: MergeConfig, teachers: list[str | Path | nn.Module], out: str | Path, resume: bool = False,
          arch: str | None = None, num_classes: int | None = None, progress: bool = True,
          echo: Callable[[str], None] = log.info, device: str = "cpu", workers: int | None = 0,
          ema: bool = False, state_key: str | None = None, _stop_after_epochs: int | None = None) -> dict[str, Any]:
    """Run (or resume) a merge of two teachers (checkpoint paths or networks slimkit created); returns the
    summary record (accuracies and parameter counts).

    ``workers``: loader processes for image sets (None: slimkit.data.loading.default_workers()); results do not depend on it.
    ``ema``/``state_key`` pick the teachers' weights in training checkpoints (see :func:`slimkit.read`)."""
    from slimkit.data.loading import check_workers

    workers = check_workers(workers)
    device = resolve_device(device)  # before the group: the chosen device picks its backend
    with process_group(device) as (rank, world):
        return _merge(cfg, teachers, Path(out), resume, arch, num_classes, progress and rank == 0,
                      echo if rank == 0 else (lambda s: None), StopAfter(_stop_after_epochs), rank, world, device,
                      workers, ema, state_key)


def _merge(cfg: MergeConfig, paths, out: Path, resume: bool, arch, num_classes, progress: bool, echo,
           stop: StopAfter, rank: int, world: int, device: str, workers: int = 0, ema: bool = False,
           state_key: str | None = None) -> dict[str, Any]:
    from slimkit.methods.merge.transform import GatedStudent, compress, concat_teachers

    loaded = _read_teachers(paths, arch, num_classes, ema, state_key)
    ta, tb = (ld.model for ld in loaded)
    try:  # concat_teachers is the one check that the teachers fit together; it runs before anything is written
        big = concat_teachers(ta, tb)
    except SlimkitError as exc:
        raise SlimkitError(f"cannot merge {paths[0]} and {paths[1]}: {exc}") from None
    config = {**cfg.to_json(), "teachers": [ld.sha256 for ld in loaded]}
    run = RunDir(out, "merge", config, resume, main=rank == 0).check()
    spec = ta.slimkit_spec
    c, h = spec.input_shape[0], spec.input_shape[1]
    train_ds, test = datasets(cfg.data, c, h, cfg.train_per_class, cfg.subset_seed, cfg.augment, workers)
    classes = num_classes_of(train_ds, test)
    if spec.args.get("num_classes") != classes:
        raise SlimkitError(f"the teachers have {spec.args.get('num_classes')} classes but {cfg.data} has {classes}")
    barrier(world)
    run.begin()
    augment = train_ds.batch_augment

    if run.state is None and run.main:  # a new run, or one stopped before its first state: start from the teachers
        for m in (ta, tb, big):
            prepare_model(m, device)  # evaluated on the chosen device
        rec = {"kind": "teachers", "teacher_a": accuracy(ta, test, device=device),
               "teacher_b": accuracy(tb, test, device=device),
               "ensemble": accuracy([ta, tb], test, device=device), "big_student": accuracy(big, test, device=device),
               "teacher_params": count_params(ta), "big_params": count_params(big),
               "teacher_paths": [str(p) for p in paths]}
        run.log(rec)
        run.save_model(big, "big.pt", provenance={"recipe": "slimkit merge: concatenated teachers",
                                                  "teachers": rec["teacher_paths"]})
        echo(f"teachers {100 * rec['teacher_a']:.2f}% / {100 * rec['teacher_b']:.2f}%, ensemble "
             f"{100 * rec['ensemble']:.2f}%, big student {100 * rec['big_student']:.2f}% "
             f"({rec['big_params']:,} parameters)")

    st = run.state or {"phase": "gates", "epochs_done": 0}
    if run.state is not None:
        if st["phase"] == "finetune" and int(st["epochs_done"]) >= cfg.finetune.epochs:
            echo(f"{out} has finished fine-tuning; writing its outputs again from state.pt")
        else:
            echo(f"resuming {out} in the {st['phase']} phase at epoch {int(st['epochs_done']) + 1}")

    # --- importance learning -----------------------------------------------------------------
    torch.manual_seed(cfg.gate.seed)
    gated = GatedStudent(big)
    if st["phase"] == "gates":
        net = ddp(prepare_model(gated, device), world)
        weights = [p for n, p in gated.named_parameters() if not n.startswith("log_alpha")]
        sgd = torch.optim.SGD(weights, lr=cfg.gate.lr, momentum=cfg.gate.momentum, weight_decay=cfg.gate.weight_decay)
        adam = torch.optim.Adam(gated.log_alpha.parameters(), lr=cfg.gate_lr, weight_decay=0.0)
        adam.param_groups[0]["lr_scale"] = cfg.gate_lr / cfg.gate.lr
        opt = Optimizers(sgd, adam)
        lam = [cfg.lambda_init]
        if run.state is not None:
            gated.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            lam = [float(st["lambda"])]

        def on_epoch(epoch: int, record: dict[str, Any]) -> None:
            with torch.no_grad():
                penalty = float(gated.penalty())
            record.update(**{"lambda": lam[0]}, penalty=penalty,
                          open_fraction=dict(zip(gated.group_names(), gated.open_fraction())),
                          p_open=float(torch.cat([p.detach() for p in gated.p_open()]).mean()))
            lam[0] += cfg.lambda_step * math.sqrt(lam[0])

        finished = run_epochs(
            net=net, model=gated, train=train_ds, test=test, opt=opt, cfg=cfg.gate, phase="gates",
            start=int(st["epochs_done"]), run=run, progress=progress, eval_every=cfg.eval_every,
            augment=augment, extra_loss=lambda: lam[0] * gated.penalty(), on_epoch=on_epoch, stop=stop, device=device,
            state=lambda done: {"phase": "gates", "epochs_done": done, "model": gated.state_dict(),
                                "optimizer": opt.state_dict(), "lambda": lam[0]})
        if not finished:
            return {}
        gated.to("cpu", memory_format=torch.contiguous_format)  # surgery traces on the CPU
        student, plan = compress(gated, ta)
        if run.main:
            rec = {"kind": "compressed", "gated": accuracy(prepare_model(gated, device), test, device=device),
                   "compressed": accuracy(prepare_model(student, device), test, device=device),
                   "params": count_params(student), "kept": {g: len(i) for g, i in plan.keep.items()}}
            run.log(rec)
            run.save_model(student, "compressed.pt", merge_plan=plan.to_json(),
                           provenance={"recipe": "slimkit merge: compressed student", "config": config})
            echo(f"gated student {100 * rec['gated']:.2f}%, compressed to the teachers' size "
                 f"{100 * rec['compressed']:.2f}% ({rec['params']:,} parameters)")
            run.save_state({"phase": "finetune", "epochs_done": 0, "model": student.state_dict(), "optimizer": None})
        st = {"phase": "finetune", "epochs_done": 0}
    else:
        from slimkit.models import create_model

        student = create_model(spec.arch, input_shape=spec.input_shape, **spec.args)
        student.load_state_dict(st["model"])

    # --- fine-tuning -------------------------------------------------------------------------
    net = ddp(prepare_model(student, device), world)
    opt = make_optimizer(net, cfg.finetune)
    if st.get("optimizer") is not None:
        opt.load_state_dict(st["optimizer"])
    finished = run_epochs(
        net=net, model=student, train=train_ds, test=test, opt=opt, cfg=cfg.finetune, phase="finetune",
        start=int(st["epochs_done"]), run=run, progress=progress, eval_every=cfg.eval_every,
        augment=augment, stop=stop, generation=2, device=device,  # its own per-epoch seeds, not the gate phase's
        state=lambda done: {"phase": "finetune", "epochs_done": done, "model": student.state_dict(),
                            "optimizer": opt.state_dict()})
    if not finished or not run.main:
        return {}
    acc = accuracy(student, test, device=device)
    run.save_model(student, "last.pt", metrics={"test_acc": acc},
                   data={"name": cfg.data, "image_size": h, "in_chans": c, "split_seed": 0,
                         "preprocess": train_ds.preprocess},
                   provenance={"recipe": "slimkit merge: fine-tuned student", "config": config})
    summary = _summary(run, cfg, spec.arch, run.records(), acc, count_params(student))
    echo(f"merged student after fine-tuning: {100 * acc:.2f}% (teachers {100 * summary['teacher_a']:.2f}% / "
         f"{100 * summary['teacher_b']:.2f}%)  -> {out / 'last.pt'}")
    return summary


def _summary(run: RunDir, cfg: MergeConfig, arch: str, records: list[dict[str, Any]], final: float,
             params: int) -> dict[str, Any]:
    from slimkit.engine.train import plot_curves

    t = next(r for r in records if r["kind"] == "teachers")
    comp = next(r for r in records if r["kind"] == "compressed")
    epochs = [r for r in records if r["kind"] == "epoch"]
    rows = [("teacher A", t["teacher_a"], t["teacher_params"]), ("teacher B", t["teacher_b"], t["teacher_params"]),
            ("ensemble of A and B (mean logits)", t["ensemble"], 2 * t["teacher_params"]),
            ("big student (concatenated, untrained)", t["big_student"], t["big_params"]),
            (f"gated big student after {cfg.gate.epochs} gate epochs", comp["gated"], t["big_params"]),
            ("compressed (half of every group kept)", comp["compressed"], comp["params"]),
            (f"merged student, fine-tuned {cfg.finetune.epochs} epochs", final, params)]
    lines = [f"# Merging two {arch} teachers on {cfg.data}", "",
             f"gates: {cfg.gate.epochs} epochs, lr {cfg.gate.lr:g}, gate lr {cfg.gate_lr:g} (Adam), "
             f"lambda {cfg.lambda_init:g} += {cfg.lambda_step:g}*sqrt(lambda) per epoch; fine-tune: "
             f"{cfg.finetune.epochs} epochs, lr {cfg.finetune.lr:g}"
             + (f"; {cfg.train_per_class} training images per class" if cfg.train_per_class else ""), "",
             "| network | test accuracy | parameters |", "|---|---:|---:|"]
    lines += [f"| {name} | {100 * acc:.2f}% | {p:,} |" for name, acc, p in rows]
    better = max(t["teacher_a"], t["teacher_b"])
    verdict = "beats" if final > better else ("ties" if final == better else "does not beat")
    lines += ["", f"The merged student {verdict} the better teacher ({100 * final:.2f}% vs {100 * better:.2f}%)."]
    run.write_text("summary.md", "\n".join(lines) + "\n")
    gate_epochs = [r for r in epochs if r.get("phase") == "gates"]
    if gate_epochs:
        run.write_figure("gates.png", plot_gates(gate_epochs))
    run.write_figure("curves.png", plot_curves(epochs, title=f"merging two {arch}"))
    return {"teacher_a": t["teacher_a"], "teacher_b": t["teacher_b"], "ensemble": t["ensemble"],
            "big_student": t["big_student"], "gated": comp["gated"], "compressed": comp["compressed"],
            "merged": final, "params": params, "teacher_params": t["teacher_params"]}


def plot_gates(gate_epochs: list[dict[str, Any]]):
    """A figure of the fraction of open (non-zero eval) gates per gated layer group against gate epoch."""
    import matplotlib

    from slimkit.core.plots import figure

    names = list(gate_epochs[0]["open_fraction"])
    x = [r["epoch"] for r in gate_epochs]
    fig, ax = figure(size=(7, 4))
    cmap = matplotlib.colormaps["viridis"]
    for i, n in enumerate(names):
        ax.plot(x, [r["open_fraction"][n] for r in gate_epochs], color=cmap(i / max(len(names) - 1, 1)),
                lw=1, label=n if len(names) <= 12 else None)
    ax.plot(x, [r["p_open"] for r in gate_epochs], "k--", lw=2, label="mean P(gate open)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("gate epoch")
    ax.set_ylabel("fraction of gates open")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="lower left")
    fig.tight_layout()
    return fig
