"""`slimkit routes`: every route to the same slim network, run on the user's data at one training budget.

For each seed, in one parent run directory (``seed{S}/{route}/``, each a resumable run of its own verb):

- ``dense``: the dense network trained for the whole budget B epochs (``slimkit train``); it is the
  teacher of ``distill`` and the source of ``prune``;
- ``ke``: Knowledge Evolution for B / E generations of E epochs (``slimkit evolve``), then its fit
  hypothesis cut out of the last generation (``extract``); its first generation is the paper's
  baseline, dense N1 (E epochs), read from the same run;
- ``scratch``: the fit hypothesis's architecture trained B epochs from a seeded init (``train --slim``);
- ``prune``: ``dense`` pruned to the KELS widths by ``criterion`` and fine-tuned F epochs (``prune``):
  it spends B + F epochs, and the table says so;
- ``distill``: ``scratch`` with ``dense`` as its teacher (``train --slim --teacher``): B epochs of the
  student plus the teacher's B.

Every route's slim network has the same layer widths (the KELS widths of the split rate), so the
table compares network for network: test accuracy (mean and sd over the seeds), parameters, MACs and
ONNX Runtime latency (one measurement of each distinct architecture, dense and slim, timed side by side
after the training), and picks the most accurate slim route, whose best seed's checkpoint it copies to
``pick.pt``. The parent's ``metrics.jsonl`` holds one record per finished sub-run and ``state.pt`` the
count; a resume skips what finished and resumes the sub-run a crash interrupted.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

from slimkit.core.errors import SlimkitError
from slimkit.core.globalstate import keep_global_state
from slimkit.core.plan import check_split_rate
from slimkit.engine.loop import LOSSES, TrainConfig
from slimkit.engine.rundir import RunDir
from slimkit.engine.train import KD_TEMPERATURE, KD_WEIGHT, TrainRunConfig, train
from slimkit.methods.routes.prune import CRITERIA
from slimkit.methods.routes.report import measure, write_report

log = logging.getLogger("slimkit")

__all__ = ["ROUTES", "RoutesConfig", "run_routes", "minimum_budget"]

ROUTES = ("dense", "ke", "scratch", "prune", "distill")  # the sub-runs (dense N1 comes from ke's first generation)
NEEDS_DENSE = ("prune", "distill")


def minimum_budget(epochs: int) -> int:
    """The smallest budget: Knowledge Evolution needs two generations of ``epochs`` epochs."""
    return 2 * int(epochs)


@dataclasses.dataclass
class RoutesConfig:
    arch: str = "cifar_resnet"
    data: str = "digits"
    split_rate: float = 0.5
    budget: int = 300  # training epochs every route gets (KE: budget / epochs generations)
    epochs: int = 30  # epochs of one KE generation (and of dense N1)
    seeds: tuple[int, ...] = (0, 1, 2)
    routes: tuple[str, ...] = ROUTES
    criterion: str = "l1"  # prune's importance
    finetune_epochs: int | None = None  # prune's fine-tuning (None: one generation's epochs)
    finetune_lr: float = 0.01
    kd_weight: float = KD_WEIGHT
    kd_temperature: float = KD_TEMPERATURE
    image_size: int | None = None
    train_per_class: int | None = None
    subset_seed: int = 0
    model_args: dict[str, Any] | None = None
    num_classes: int | None = None
    augment: str = "auto"
    lr: float = 0.05
    warmup_epochs: int = 5
    batch_size: int = 64
    weight_decay: float = 5e-4
    loss: str = "ce"
    latency_batches: tuple[int, ...] = (1, 8)
    provider: str = "cpu"
    threads: int | None = None
    warmup: int = 10
    runs: int = 50

    def __post_init__(self):
        self.split_rate = check_split_rate(self.split_rate)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.routes = tuple(self.routes)
        self.latency_batches = tuple(int(b) for b in self.latency_batches)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise SlimkitError(f"seeds must be distinct integers, at least one, got {list(self.seeds)}")
        unknown = [r for r in self.routes if r not in ROUTES]
        if unknown or not self.routes:
            raise SlimkitError(f"unknown route {unknown[0] if unknown else '(none given)'!r}; available: {', '.join(ROUTES)}")
        if any(r in self.routes for r in NEEDS_DENSE) and "dense" not in self.routes:
            self.routes = ("dense", *self.routes)  # the teacher and the source of pruning
        self.routes = tuple(r for r in ROUTES if r in self.routes)
        if self.criterion not in CRITERIA:
            raise SlimkitError(f"unknown pruning criterion {self.criterion!r}; available: {', '.join(CRITERIA)}")
        if self.loss not in LOSSES:
            raise SlimkitError(f"unknown loss {self.loss!r}; available: {', '.join(LOSSES)}")
        if self.loss == "cskd" and "distill" in self.routes:
            raise SlimkitError("the distill route distils the dense network's soft targets and --loss cskd the "
                               "network's own; give --loss ce or smooth, or leave distill out of --routes")
        if int(self.epochs) < 1:
            raise SlimkitError(f"epochs per generation must be a positive integer, got {self.epochs!r}")
        if int(self.budget) < minimum_budget(self.epochs):
            raise SlimkitError(f"--budget {self.budget} is smaller than the routes need: Knowledge Evolution needs at "
                               f"least two generations of --epochs {self.epochs}, so the minimum budget is "
                               f"{minimum_budget(self.epochs)} epochs")
        if self.budget % self.epochs:
            lo, hi = self.budget - self.budget % self.epochs, self.budget + self.epochs - self.budget % self.epochs
            raise SlimkitError(f"--budget {self.budget} is not a whole number of KE generations of --epochs "
                               f"{self.epochs}; use {lo} or {hi}")
        if self.finetune_epochs is not None and int(self.finetune_epochs) < 1:
            raise SlimkitError(f"finetune_epochs must be a positive integer, got {self.finetune_epochs!r}")
        self.finetune_epochs = int(self.finetune_epochs or self.epochs)
        TrainConfig(**self._train(self.budget, 0))  # refuses a bad lr, batch size, decay before anything runs
        TrainRunConfig(arch=self.arch, data=self.data, image_size=self.image_size, train_per_class=self.train_per_class,
                       model_args=self.model_args, augment=self.augment, kd_weight=self.kd_weight,
                       kd_temperature=self.kd_temperature)

    @property
    def generations(self) -> int:
        return self.budget // self.epochs

    def _train(self, epochs: int, seed: int, lr: float | None = None, warmup: int | None = None) -> dict[str, Any]:
        return dict(epochs=epochs, batch_size=self.batch_size, lr=lr or self.lr,
                    warmup_epochs=self.warmup_epochs if warmup is None else warmup,
                    weight_decay=self.weight_decay, loss=self.loss, seed=seed)

    def spent(self, route: str) -> str:
        """What a route trained, in epochs, as the table states it."""
        b, e = self.budget, self.epochs
        return {"dense1": f"{e}", "dense": f"{b}", "ke_dense": f"{self.generations} x {e} = {b}",
                "ke": f"{self.generations} x {e} = {b}", "scratch": f"{b}",
                "prune": f"{b} (dense) + {self.finetune_epochs} fine-tune", "distill": f"{b} (+ {b} of the teacher)"}[route]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _common(cfg: RoutesConfig) -> dict[str, Any]:
    return dict(arch=cfg.arch, data=cfg.data, image_size=cfg.image_size, train_per_class=cfg.train_per_class,
                subset_seed=cfg.subset_seed, model_args=cfg.model_args, num_classes=cfg.num_classes,
                augment=cfg.augment, eval_every=cfg.epochs)


def _sub_run(out: Path) -> bool:
    """Whether ``out`` holds a started run to resume (else a new one starts there)."""
    return (out / "config.json").is_file()


def _route(cfg: RoutesConfig, route: str, seed: int, base: Path, kw: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Run (or resume) one sub-run; its records for the table, or None when a test hook stopped it."""
    out = base / route
    common = dict(resume=_sub_run(out), **kw)
    if route == "dense":
        res = train(TrainRunConfig(**_common(cfg), train=TrainConfig(**cfg._train(cfg.budget, seed))), out, **common)
        return [{"route": "dense", "test_acc": res["test_acc"], "checkpoint": str(out / "last.pt")}] if res else None
    if route == "scratch" or route == "distill":
        teacher = str(base / "dense" / "last.pt") if route == "distill" else None
        res = train(TrainRunConfig(**_common(cfg), slim=cfg.split_rate, teacher=teacher, kd_weight=cfg.kd_weight,
                                   kd_temperature=cfg.kd_temperature, train=TrainConfig(**cfg._train(cfg.budget, seed))),
                    out, **common)
        return [{"route": route, "test_acc": res["test_acc"], "checkpoint": str(out / "last.pt")}] if res else None
    if route == "prune":
        from slimkit.methods.routes.pruning import PruneRunConfig, prune_run

        pc = PruneRunConfig(ckpt=str(base / "dense" / "last.pt"), split_rate=cfg.split_rate, criterion=cfg.criterion,
                            data=cfg.data, train_per_class=cfg.train_per_class, subset_seed=cfg.subset_seed,
                            eval_every=cfg.finetune_epochs, augment=cfg.augment,
                            finetune=TrainConfig(**cfg._train(cfg.finetune_epochs, seed, cfg.finetune_lr, 1)))
        res = prune_run(pc, out, **common)
        return [{"route": "prune", "test_acc": res["test_acc"], "checkpoint": str(out / "last.pt")}] if res else None
    from slimkit.methods.ke.evolve import EvolveConfig, evolve
    from slimkit.methods.ke.extract import extract

    ec = EvolveConfig(**_common(cfg), split_mode="kels", split_rate=cfg.split_rate, generations=cfg.generations,
                      train=TrainConfig(**cfg._train(cfg.epochs, seed)))
    recs = evolve(ec, out, **common)
    if len(recs) < cfg.generations:
        return None
    last, fit = out / f"gen{cfg.generations}" / "last.pt", out / "fit.pt"
    extract(last, cfg.split_rate, out=fit, force=True)  # the KE route's slim checkpoint, verified
    return [{"route": "dense1", "test_acc": recs[0]["dense_acc"], "checkpoint": str(out / "gen1" / "last.pt")},
            {"route": "ke_dense", "test_acc": recs[-1]["dense_acc"], "checkpoint": str(last)},
            {"route": "ke", "test_acc": recs[-1]["fit_acc"], "checkpoint": str(fit)}]


def run_routes(cfg: RoutesConfig, out: str | Path, resume: bool = False, progress: bool = True,
               echo: Callable[[str], None] = log.info, device: str = "auto", workers: int | None = None) -> dict[str, Any]:
    """Run every route of ``cfg`` for every seed in ``out`` (resumable), then measure, tabulate, plot and
    pick (:mod:`slimkit.methods.routes.report`); returns the report's JSON (empty when a test hook
    stopped the run)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SlimkitError("slimkit routes runs its routes one after another in one process; start it without "
                           "torchrun (each route's own verb, e.g. `train`, runs data-parallel under torchrun)")
    out = Path(out)
    with keep_global_state():
        run = RunDir(out, "routes", cfg.to_json(), resume).check()
        run.begin()
        done = {(r["seed"], r["route"]) for r in run.records("route")}
        kw = dict(progress=progress, echo=echo, device=device, workers=workers)
        for seed in cfg.seeds:
            for route in cfg.routes:
                names = ("dense1", "ke_dense", "ke") if route == "ke" else (route,)
                if all((seed, n) in done for n in names):
                    continue
                echo(f"routes: seed {seed}, {route} ({cfg.spent(names[-1])} epochs)")
                (out / f"seed{seed}").mkdir(exist_ok=True)
                recs = _route(cfg, route, seed, out / f"seed{seed}", kw)
                if recs is None:
                    return {}  # a test hook stopped the sub-run: the parent stops as a crash there would
                for rec in recs:  # checkpoints relative to the run: a resume from elsewhere finds them
                    rec["checkpoint"] = str(Path(rec["checkpoint"]).relative_to(out))
                    run.log({"kind": "route", "seed": seed, **rec})
                run.save_state({"routes_done": len(run.records("route"))})
        records = [{**r, "checkpoint": str(out / r["checkpoint"])} for r in run.records("route")]
        latency = run.state.get("latency") if run.state is not None else None
        if latency is None:
            latency = measure(cfg, records, out / "onnx", echo)
            run.log({"kind": "latency", **latency})
            run.save_state({"routes_done": len(records), "latency": latency})
        report = write_report(run, cfg, records, latency)
        echo(report.pop("markdown"))
        pick = report["pick"]
        if pick is not None:
            shutil.copyfile(pick["checkpoint"], out / ".pick.pt.tmp")
            (out / ".pick.pt.tmp").replace(out / "pick.pt")
            echo(f"routes: the most accurate slim network is {pick['route']} ({100 * pick['mean']:.2f}% +- "
                 f"{100 * pick['sd']:.2f}); seed {pick['seed']}'s checkpoint -> {out / 'pick.pt'}")
        return report
