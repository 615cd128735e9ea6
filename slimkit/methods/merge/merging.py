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
from typing import Any, Callable, Sequence

import torch
from torch import nn

from slimkit.core.cost import count_params
from slimkit.core.errors import SlimkitError
from slimkit.core.globalstate import keep_global_state, seed_global
from slimkit.data.select import datasets, num_classes_of
from slimkit.engine.distributed import barrier, ddp, process_group, resolve_device
from slimkit.engine.epochs import Phase, log_epoch, run_phases
from slimkit.engine.evaluate import accuracy
from slimkit.engine.loop import Optimizers, Supervised, TrainConfig, make_optimizer, prepare_model
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
                   state_key: str | None = None, model_args: dict[str, Any] | None = None,
                   input_shape: tuple[int, ...] | None = None):
    """The two teachers: checkpoint paths, or networks slimkit created (``nn.Module`` objects)."""
    from slimkit.models.checkpoint import source

    if len(teachers) != 2:
        raise SlimkitError(f"merge takes exactly two teacher checkpoints, got {len(teachers)}")
    a, b = teachers
    objects = [isinstance(t, nn.Module) for t in teachers]
    if a is b or (not any(objects) and Path(a).resolve() == Path(b).resolve()):
        raise SlimkitError(f"both teachers are {a if not objects[0] else 'the same network'}; merging needs two "
                           "independently trained networks")
    from slimkit.models.registry import run_at

    if model_args is not None and "num_classes" in model_args:
        raise SlimkitError("give the class count with --num-classes, not --model-args")
    loaded = [source(t, input_shape=input_shape) if isinstance(t, nn.Module) else
              source(t, arch=arch, num_classes=num_classes, model_args=model_args or {}, ema=ema, state_key=state_key,
                     input_shape=input_shape) for t in teachers]
    for ld in loaded:
        run_at(ld.model, input_shape)
    return loaded


def merge(cfg: MergeConfig, teachers: list[str | Path | nn.Module], out: str | Path, resume: bool = False,
          arch: str | None = None, num_classes: int | None = None, progress: bool = True,
          echo: Callable[[str], None] = log.info, device: str = "auto", workers: int | None = None,
          ema: bool = False, state_key: str | None = None, model_args: dict[str, Any] | None = None,
          input_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """Run (or resume) a merge of two teachers (checkpoint paths or networks slimkit created); returns the
    summary record (accuracies and parameter counts).

    ``workers``: loader processes for image sets (None: slimkit.data.loading.default_workers()); results do not depend on it.
    ``ema``/``state_key`` pick the teachers' weights in training checkpoints (see :func:`slimkit.read`);
    ``model_args`` and ``input_shape`` (C, H, W) build plain state_dict teachers, as in extract.
    Torch's global generators, thread count and cudnn flags are left as they were."""
    from slimkit.data.loading import check_workers

    workers = check_workers(workers)
    with keep_global_state():
        device = resolve_device(device)  # before the group: the chosen device picks its backend
        with process_group(device) as (rank, world):
            return _merge(cfg, teachers, Path(out), resume, arch, num_classes, progress and rank == 0,
                          echo if rank == 0 else (lambda s: None), rank, world, device, workers, ema, state_key,
                          model_args, None if input_shape is None else tuple(int(s) for s in input_shape))


def _merge(cfg: MergeConfig, paths, out: Path, resume: bool, arch, num_classes, progress: bool, echo,
           rank: int, world: int, device: str, workers: int = 0, ema: bool = False,
           state_key: str | None = None, model_args: dict[str, Any] | None = None,
           input_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    from slimkit.methods.merge.transform import GatedStudent, concat_teachers

    loaded = _read_teachers(paths, arch, num_classes, ema, state_key, model_args, input_shape)
    ta, tb = (ld.model for ld in loaded)
    try:  # concat_teachers is the one check that the teachers fit together; it runs before anything is written
        big = concat_teachers(ta, tb)
    except SlimkitError as exc:
        raise SlimkitError(f"cannot merge {paths[0]} and {paths[1]}: {exc}") from exc
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

    seed_global(cfg.gate.seed, device)
    gated = GatedStudent(big)
    cur: dict[str, Any] = {}  # what the phases hand on: the optimizer, lambda, the compressed student
    phases = [_gate_phase(cfg, gated, ta, train_ds, test, run, st, cur, config, echo, progress, world, device),
              _finetune_phase(cfg, spec, train_ds, test, run, st, cur, progress, world, device)]
    if not run_phases(phases, 0 if st["phase"] == "gates" else 1, int(st["epochs_done"])) or not run.main:
        return {}  # stopped by a test hook (as a crash would), or a rank that writes nothing
    student = cur["student"]
    acc = accuracy(student, test, device=device)
    run.save_model(student, "last.pt", metrics={"test_acc": acc},
                   data={"name": cfg.data, "image_size": h, "in_chans": c, "split_seed": 0,
                         "preprocess": train_ds.preprocess},
                   provenance={"recipe": "slimkit merge: fine-tuned student", "config": config})
    summary = _summary(run, cfg, spec.arch, run.records(), acc, count_params(student))
    echo(f"merged student after fine-tuning: {100 * acc:.2f}% (teachers {100 * summary['teacher_a']:.2f}% / "
         f"{100 * summary['teacher_b']:.2f}%)  -> {out / 'last.pt'}")
    return summary


def _gate_phase(cfg: MergeConfig, gated, ta, train_ds, test, run: RunDir, st: dict[str, Any], cur: dict[str, Any],
                config, echo, progress: bool, world: int, device: str) -> Phase:
    """Importance learning: weights by SGD, log alpha by Adam, the half-open penalty growing every epoch;
    at its end the gated student is compressed to the teachers' size."""
    from slimkit.methods.merge.transform import compress

    def begin(done: int):
        net = ddp(prepare_model(gated, device), world)
        weights = [p for n, p in gated.named_parameters() if not n.startswith("log_alpha")]
        sgd = torch.optim.SGD(weights, lr=cfg.gate.lr, momentum=cfg.gate.momentum, weight_decay=cfg.gate.weight_decay)
        adam = torch.optim.Adam(gated.log_alpha.parameters(), lr=cfg.gate_lr, weight_decay=0.0)
        adam.param_groups[0]["lr_scale"] = cfg.gate_lr / cfg.gate.lr
        cur["opt"] = opt = Optimizers(sgd, adam)
        cur["lambda"] = cfg.lambda_init
        if run.state is not None:
            gated.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            cur["lambda"] = float(st["lambda"])
        return net, opt, Supervised(net, train_ds, cfg.gate, 1, train_ds.batch_augment, progress, device, "gates",
                                    extra_loss=lambda: cur["lambda"] * gated.penalty())

    def end_epoch(epoch: int, record: dict[str, Any]) -> None:
        lam = cur["lambda"]
        with torch.no_grad():  # on every rank: lambda is training state
            penalty = float(gated.penalty())
        extra = {"lambda": lam, "penalty": penalty, "open_fraction": dict(zip(gated.group_names(), gated.open_fraction())),
                 "p_open": float(torch.cat([p.detach() for p in gated.p_open()]).mean())}
        cur["lambda"] = lam + cfg.lambda_step * math.sqrt(lam)
        if run.main:
            evaluate = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.gate.epochs
            log_epoch(run, {"kind": "epoch", "phase": "gates", "epoch": epoch + 1, **record, **extra},
                      (lambda: {"test_acc": accuracy(gated, test, device=device)}) if evaluate else None,
                      lambda: {"phase": "gates", "epochs_done": epoch + 1, "model": gated.state_dict(),
                               "optimizer": cur["opt"].state_dict(), "lambda": cur["lambda"]})

    def end() -> None:
        gated.to("cpu", memory_format=torch.contiguous_format)  # surgery traces on the CPU
        student, plan = compress(gated, ta)
        cur["student"], cur["fresh"] = student, True
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

    return Phase("gates", cfg.gate.epochs, begin, end_epoch, end)


def _finetune_phase(cfg: MergeConfig, spec, train_ds, test, run: RunDir, st: dict[str, Any], cur: dict[str, Any],
                    progress: bool, world: int, device: str) -> Phase:
    """Fine-tuning of the compressed student with the normal loop (its own per-epoch seeds: generation 2)."""

    def begin(done: int):
        if "student" not in cur:  # resumed in this phase: the student as state.pt holds it
            from slimkit.models import create_model

            cur["student"] = create_model(spec.arch, input_shape=spec.input_shape, **spec.args)
            cur["student"].load_state_dict(st["model"])
        student = cur["student"]
        net = ddp(prepare_model(student, device), world)
        cur["opt"] = opt = make_optimizer(net, cfg.finetune)
        if not cur.get("fresh") and st.get("optimizer") is not None:
            opt.load_state_dict(st["optimizer"])
        return net, opt, Supervised(net, train_ds, cfg.finetune, 2, train_ds.batch_augment, progress, device, "finetune")

    def end_epoch(epoch: int, record: dict[str, Any]) -> None:
        if run.main:
            student = cur["student"]
            evaluate = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.finetune.epochs
            log_epoch(run, {"kind": "epoch", "phase": "finetune", "epoch": epoch + 1, **record},
                      (lambda: {"test_acc": accuracy(student, test, device=device)}) if evaluate else None,
                      lambda: {"phase": "finetune", "epochs_done": epoch + 1, "model": student.state_dict(),
                               "optimizer": cur["opt"].state_dict()})

    return Phase("finetune", cfg.finetune.epochs, begin, end_epoch)


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
