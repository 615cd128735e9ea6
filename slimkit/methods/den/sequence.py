"""Lifelong learning with Dynamically Expandable Networks: `slimkit den` (Yoon et al., ICLR 2018).

Tasks arrive in order and earlier tasks' data is gone when task t is learned. Per task:

1. t = 1: train the network with an L1 penalty (proximal), so each unit connects to few below;
2. t > 1, selective retraining: a new head for task t is fitted alone with L1 on the frozen network;
   breadth-first search down through non-zero weights gives the subnetwork S; only W_S (and the
   head) retrains, with an L2 penalty;
3. dynamic expansion: k units join every hidden layer and only they (with the units stamped t and the
   head) train, with L1 + group lasso on each new unit's incoming weights; units whose group norm
   reaches zero are removed by a KeepPlan and the one surgery. When: by default (expand_on "val") after
   the split, if task t's accuracy on a held-out share of its images is more than tau_val below a network
   trained on task t alone; the paper's rule (expand_on "train": training loss after selective
   retraining above tau) never fires on small sets, which are fitted to ~0 loss;
4. split: W_S retrains with lambda * ||W - W^{t-1}||^2; every old unit whose incoming weights moved
   more than sigma is duplicated (the old copy gets its task-(t-1) weights back), then the units
   stamped t retrain briefly;
5. timestamped inference: task s uses only units added at or before s.

The same run trains the paper's baselines on the same tasks: DNN (fine-tuning), DNN-L2, EWC,
DNN-STL (one network per task) and DNN-MTL (joint training on all tasks).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import TensorDataset

from slimkit.core.cost import count_params
from slimkit.core.globalstate import keep_global_state
from slimkit.methods.den import steps as D
from slimkit.methods.den.baselines import all_params, mtl, new_net, sequential, stl
from slimkit.methods.den.config import DENConfig
from slimkit.methods.den.tasks import Task, make_tasks, score

log = logging.getLogger("slimkit")

__all__ = ["run_den"]


def _den_task(net, t: int, task: Task, cfg: DENConfig, gen: torch.Generator) -> dict[str, Any]:
    """Learn task t with DEN; returns what happened (selected, added, pruned, duplicated units)."""
    data, val = task.train, None
    if t > 1 and cfg.expand_on == "val":  # task t's steps learn from `data`; `val` only decides the expansion
        data, val = _holdout(task.train, cfg.val_fraction, cfg.seed * 1000 + t)
    fit = lambda masks, pen, epochs=cfg.epochs: D.train_task(net, t, data, masks, epochs, cfg.lr,  # noqa: E731
                                                       cfg.batch_size, pen, seed=cfg.seed * 1000 + t)
    rec: dict[str, Any] = {"selected": 0, "added": 0, "pruned": 0, "duplicated": 0, "expanded": False}

    def expand() -> None:
        rec["expanded"] = True
        grown = D.grow(net, cfg.k, t, gen)
        fit(D.new_unit_masks(net, t), D.Penalties(l1=cfg.l1, group=cfg.group))
        dead = D.dead_units(net, t)
        # after the split (val rule) the units stamped t include the split's copies: the group lasso may
        # remove some of them too; they are counted apart from the grown units
        rec["pruned"] = sum(len(set(d) & set(g)) for d, g in zip(dead, grown))
        rec["pruned_copies"] = sum(len(d) for d in dead) - rec["pruned"]
        rec["added"] = cfg.k * len(net.hidden) - rec["pruned"]
        D.remove_units(net, dead)

    if t == 1:
        D.add_head(net, task.classes, gen)
        rec["loss"] = fit(all_params(net), D.Penalties(l1=cfg.l1))
        return rec
    snap = D.snapshot(net)
    D.add_head(net, task.classes, gen)
    head = {f"heads.{t - 1}.weight": None, f"heads.{t - 1}.bias": None}
    fit(head, D.Penalties(l1=cfg.l1_head))  # a sparse head: it selects the units task t reads
    selected = D.select_units(net, t)
    rec["selected"] = sum(len(s) for s in selected)
    fit(D.selected_masks(net, selected, t), D.Penalties(l2=cfg.l2))
    loss = D.task_loss(net, t, data)
    rec["loss_selective"] = loss
    if cfg.expand_on == "train" and loss > cfg.tau:
        expand()
    # split: retrain W_S towards W^{t-1}, duplicate the units that drifted anyway
    fit(D.selected_masks(net, selected, t), D.Penalties(l2_to=cfg.drift_lambda, ref=snap))
    rho = D.drift(net, snap)
    dup = D.split_units(net, snap, cfg.sigma, t)
    rec["duplicated"] = sum(len(d) for d in dup)
    if rec["duplicated"] or rec["added"]:
        # the split changed task t's network (restored originals still feed it): retrain briefly what task t
        # may change: the units stamped t, the head, and the selected old units that drifted but stayed under
        # sigma (anchored as before). Restored units and units that never moved stay exactly as they are.
        allowed = [[i for i in sel if 0 < float(rho[layer][i]) <= cfg.sigma] for layer, sel in enumerate(selected)]
        masks = _union(D.selected_masks(net, allowed, t), D.new_unit_masks(net, t))
        fit(masks, D.Penalties(l2_to=cfg.drift_lambda, ref=snap), epochs=max(1, cfg.epochs // 3))
    if val is not None and len(val):
        # the decision on images no step of task t has seen: task t's network as it now is, against a network
        # of the same architecture trained on task t alone (as STL) from the same images
        rec["val_acc"] = _accuracy(net, t, val)
        rec["val_ref"] = _reference_accuracy(cfg, task, data, val, t, next(net.parameters()).device)
        if rec["val_acc"] < rec["val_ref"] - cfg.tau_val:
            data = task.train  # the decision is taken: the new units learn from all of task t's images
            expand()
    rec["loss"] = D.task_loss(net, t, task.train)
    return rec


def _holdout(ds: TensorDataset, fraction: float, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(rest, held out): a seeded ``fraction`` of every class (at least one image; none of a class of one)."""
    x, y = ds.tensors
    g = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(y), dtype=torch.bool)
    for c in y.unique():
        members = torch.nonzero(y == c).flatten()
        if len(members) > 1:
            n = min(len(members) - 1, max(1, round(fraction * len(members))))
            held[members[torch.randperm(len(members), generator=g)[:n]]] = True
    return TensorDataset(x[~held], y[~held]), TensorDataset(x[held], y[held])


@torch.no_grad()
def _accuracy(net, task_id: int, data: TensorDataset) -> float:
    net.eval()
    x, y = data.tensors
    return float((net(x.to(next(net.parameters()).device), task_id).argmax(1).cpu() == y).float().mean())


def _reference_accuracy(cfg: DENConfig, task: Task, data: TensorDataset, val: TensorDataset, t: int,
                        device) -> float:
    """Held-out accuracy of a fresh network trained on task t alone (STL's recipe, same seed as STL's)."""
    ref = new_net(cfg, (task.classes,), cfg.seed + t, device)
    D.train_task(ref, 1, data, all_params(ref), cfg.epochs, cfg.lr, cfg.batch_size, None, seed=cfg.seed * 1000 + t)
    return _accuracy(ref, 1, val)


def _union(a: dict, b: dict) -> dict:
    """Entry-wise OR of two gradient-mask dicts (None frees the whole parameter)."""
    out = dict(a)
    for n, m in b.items():
        if n not in out or out[n] is None or m is None:
            out[n] = None if (m is None or out.get(n, 0) is None) else m
        else:
            out[n] = out[n] | m
    return out


def _metrics(R: list[list[float]]) -> dict[str, float]:
    """Average of the last row of R, and forgetting: mean over j < T of R[j][j] - R[T][j]."""
    drops = [R[j][j] - R[-1][j] for j in range(len(R) - 1)]
    forgetting = sum(drops) / len(drops) if drops else 0.0
    return {"average": sum(R[-1]) / len(R[-1]), "forgetting": forgetting, "bwt": -forgetting}


@keep_global_state()
def run_den(cfg: DENConfig, out: str | Path, progress: bool = True, echo: Callable[[str], None] = log.info,
            resume: bool = False, device: str = "auto") -> dict[str, Any] | None:
    """Learn the task sequence with DEN and the baselines; write the run directory; return the summary.

    ``device``: cpu, cuda or auto (as the other training verbs; DEN runs in one process).

    ``resume`` continues a run in ``out`` after its last finished task or baseline (same settings);
    it ends with the same results and networks as an uninterrupted run. Torch's global generators,
    thread count and cudnn flags are left as they were. Returns None when a test hook
    (:func:`slimkit.engine.testhooks.stop_after`, counting tasks and baselines) stopped the run.
    """
    from slimkit.engine.distributed import resolve_device
    from slimkit.engine.rundir import RunDir
    from slimkit.engine.testhooks import active
    from slimkit.models.checkpoint import load

    out = Path(out)
    device = resolve_device(device)
    tasks = make_tasks(cfg.tasks, cfg.data, cfg.image_size, cfg.seed, cfg.train_per_class,
                       cfg.subset_seed)  # refuses bad specs before writing
    # runs recorded before subset_seed existed drew the --train-per-class subset from seed
    run = RunDir(out, "den", cfg.to_json(), resume, before={"subset_seed": cfg.seed}).check()
    run.begin()
    hook = active()
    t0 = time.perf_counter()
    net = new_net(cfg, (), cfg.seed, device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    R: list[list[float]] = []
    per_task: list[dict[str, Any]] = []
    results: dict[str, Any] = {}  # finished baselines
    done = 0
    if run.state is not None:
        st = run.state
        done, R, per_task, results = int(st["tasks_done"]), st["R"], st["per_task"], st["baselines"]
        if done:
            net = load(out / f"task{done}.pt").to(device)  # the grown, timestamped network after task `done`
            gen.set_state(st["generator"])
        echo(f"resuming {out} after task {done}/{len(tasks)}"
             + (f" and baselines {', '.join(results)}" if results else ""))

    def checkpoint_state() -> None:
        run.save_state({"tasks_done": done, "R": R, "per_task": per_task, "baselines": results,
                         "generator": gen.get_state()})

    it = range(done + 1, len(tasks) + 1)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="DEN tasks", unit="task", leave=False, initial=done, total=len(tasks))
    for t in it:
        task = tasks[t - 1]
        ts = time.perf_counter()
        rec = _den_task(net, t, task, cfg, gen)
        R.append([score(net, j, tasks[j - 1]) for j in range(1, t + 1)])
        rec.update(kind="task", method="den", task=t, name=task.name, widths=D.widths(net),
                   params=count_params(net), nonzero=count_params(net, nonzero=True), scores=R[-1], seconds=time.perf_counter() - ts)
        run.log(rec)
        per_task.append(rec)
        run.save_model(net, f"task{t}.pt", den={"task": t, "tasks": cfg.tasks, "record": rec},
             provenance={"recipe": "slimkit den", "config": cfg.to_json()})
        done = t
        checkpoint_state()
        echo(f"task {t}/{len(tasks)} ({task.name}): {'AUROC' if task.binary else 'acc'} {100 * R[-1][-1]:.2f}, "
             f"average so far {100 * sum(R[-1]) / t:.2f}; selected {rec['selected']}, added {rec['added']}, "
             f"pruned {rec['pruned']}, duplicated {rec['duplicated']}; widths {rec['widths']}")
        if hook is not None and hook.passed_point():
            return None  # stopped by a test hook, as a crash would
    for b in cfg.baselines:
        if b in results:
            continue
        tb = time.perf_counter()
        if b == "mtl":
            final, (params, nz) = mtl(tasks, cfg, device)
            results[b] = {"R": [final], "average": sum(final) / len(final), "forgetting": None, "bwt": None,
                          "params": params, "nonzero": nz}
        elif b == "stl":
            Rb: list[list[float]] = []
            sizes = stl(tasks, cfg, Rb, device)
            results[b] = {"R": Rb, **_metrics(Rb), "params": sum(p for p, _ in sizes),
                          "nonzero": sum(nz for _, nz in sizes),
                          "params_per_task": [sum(p for p, _ in sizes[:i + 1]) for i in range(len(sizes))]}
        else:
            Rb = []
            params, nz = sequential(b, tasks, cfg, Rb, device)
            results[b] = {"R": Rb, **_metrics(Rb), "params": params, "nonzero": nz}
        run.log({"kind": "baseline", "method": b, **results[b], "seconds": time.perf_counter() - tb})
        checkpoint_state()
        echo(f"baseline {b}: average {100 * results[b]['average']:.2f}"
             + (f", forgetting {100 * results[b]['forgetting']:.2f}" if results[b]["forgetting"] is not None else ""))
        if hook is not None and hook.passed_point():
            return None  # stopped by a test hook, as a crash would
    results = {"den": {"R": R, **_metrics(R), "params": count_params(net), "nonzero": count_params(net, True),
                       "params_per_task": [r["params"] for r in per_task]},
               **{b: results[b] for b in cfg.baselines}}
    summary = {"tasks": [t.name for t in tasks], "metric": "AUROC" if all(t.binary for t in tasks) else
               ("accuracy" if not any(t.binary for t in tasks) else "AUROC (binary) / accuracy"),
               "results": results, "den_tasks": per_task, "seconds": time.perf_counter() - t0}
    for t in range(1, len(tasks) + 1):  # each task's own network, physically cut: what `slimkit export` takes
        run.save_model(D.task_network(net, t), f"deploy/task{t}.pt", den={"task": t, "tasks": cfg.tasks},
                       provenance={"recipe": "slimkit den: units stamped <= task, head of the task",
                                   "config": cfg.to_json()})
    run.write_text("results.json", json.dumps(summary, indent=2) + "\n")
    _write_summary(run, cfg, summary)
    return summary


def _write_summary(run, cfg: DENConfig, s: dict[str, Any]) -> None:
    res, names, metric = s["results"], s["tasks"], s["metric"]
    T = len(names)
    arch = (f"conv {'-'.join(map(str, cfg.channels))} + " if cfg.channels else "MLP ") + "-".join(map(str, cfg.hidden))
    lines = [f"# DEN on {cfg.data}, tasks {cfg.tasks} ({T} tasks, scored by {metric})", "",
             f"{arch}, {cfg.epochs} epochs per phase, lr {cfg.lr:g}, L1 {cfg.l1:g}, "
             f"tau {cfg.tau:g}, k {cfg.k}, group lasso {cfg.group:g}, sigma {cfg.sigma:g}, seed {cfg.seed}", "",
             "## Methods after the last task", "",
             "| method | average | forgetting | parameters | vs STL | non-zero parameters |",
             "|---|---:|---:|---:|---:|---:|"]
    stl = res.get("stl", {}).get("params")
    for m, r in res.items():
        f = "" if r["forgetting"] is None else f"{100 * r['forgetting']:.2f}"
        rel = f"{100 * r['params'] / stl:.0f}%" if stl else ""
        lines.append(f"| {m.upper()} | {100 * r['average']:.2f} | {f} | {r['params']:,} | {rel} | {r['nonzero']:,} |")
    lines += ["", "Forgetting: mean over tasks j < T of R[j][j] - R[T][j] (backward transfer is its negative).", "",
              "## DEN: R[i][j], score on task j after learning task i", "",
              "| after \\ on | " + " | ".join(str(j + 1) for j in range(T)) + " |", "|---" * (T + 1) + "|"]
    for i, row in enumerate(res["den"]["R"]):
        lines.append(f"| {i + 1} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |" * (T - len(row)) + " |")
    lines += ["", "## DEN per task", "", "| task | selected | added | pruned | duplicated | units per layer | parameters |",
              "|---|---:|---:|---:|---:|---|---:|"]
    for r in s["den_tasks"]:
        lines.append(f"| {r['task']} ({r['name']}) | {r['selected']} | {r['added']} | {r['pruned']} | {r['duplicated']} | "
                     f"{r['widths']} | {r['params']:,} |")
    run.write_text("summary.md", "\n".join(lines) + "\n")
    run.write_figure("den.png", _plot(s))


def _plot(s: dict[str, Any]):
    from slimkit.core.plots import figure

    res = s["results"]
    fig, (ax1, ax2) = figure(1, 2, size=(9.5, 3.6))
    for m, r in res.items():
        if m == "mtl":
            ax1.axhline(100 * r["average"], ls=":", color="grey", label="MTL (joint, final)")
            continue
        avg = [100 * sum(row) / len(row) for row in r["R"]]
        ax1.plot(range(1, len(avg) + 1), avg, marker="o", ms=3, label=m.upper())
        if "params_per_task" in r:
            ax2.plot(range(1, len(avg) + 1), r["params_per_task"], marker="o", ms=3, label=m.upper())
    ax1.set_xlabel("tasks learned")
    ax1.set_ylabel(f"average {s['metric']} (%)")
    ax2.set_xlabel("tasks learned")
    ax2.set_ylabel("parameters")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
