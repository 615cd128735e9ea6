"""The routes' table, plot and pick (`slimkit routes`, :mod:`slimkit.methods.routes.run`).

:func:`measure` counts every route's parameters and MACs and times each distinct architecture once
(the dense network and the slim one every slim route shares), exported to verified ONNX and run side
by side in ONNX Runtime. :func:`write_report` writes ``routes.md`` (the table: what each route
trained, test accuracy mean ± sd over the seeds, parameters, MACs, p50 latency), ``routes.json`` and
``routes.png`` (accuracy against latency, one point per route), and picks the most accurate slim route.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

from slimkit.core.cost import count_macs, count_params
from slimkit.core.errors import SlimkitError

log = logging.getLogger("slimkit")

__all__ = ["measure", "write_report", "plot_routes", "mean_sd", "ROWS"]

# table rows: (record name, label, slim?)
ROWS = (("dense1", "dense N1 (the paper's baseline)", False), ("dense", "dense, whole budget", False),
        ("ke_dense", "KE dense, last generation", False), ("ke", "KE fit hypothesis", True),
        ("scratch", "scratch (train --slim)", True), ("prune", "prune + fine-tune", True),
        ("distill", "distill (train --slim --teacher dense)", True))
SLIM = {name for name, _, slim in ROWS if slim}


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def measure(cfg: Any, records: list[dict[str, Any]], onnx_dir: Path,
            echo: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Parameters and MACs of each route (its first seed's checkpoint) and the p50 latency (ms) of each
    distinct architecture (exported to ``onnx_dir``), keyed by route; the CPU is named. ``cfg``: the
    routes' RoutesConfig."""
    from slimkit.deploy.bench import bench_files
    from slimkit.deploy.export import to_verified_onnx
    from slimkit.deploy.runners import cpu_name
    from slimkit.models import spec_of
    from slimkit.models.checkpoint import load

    first: dict[str, str] = {}
    for r in records:
        first.setdefault(r["route"], r["checkpoint"])
    cost: dict[str, dict[str, int]] = {}
    groups: dict[tuple[int, int], list[str]] = {}  # (params, macs) -> routes of that architecture
    models = {}
    for route, path in first.items():
        model = load(path)
        shape = tuple(spec_of(model).input_shape)
        cost[route] = {"params": count_params(model), "macs": count_macs(model, shape)}
        key = (cost[route]["params"], cost[route]["macs"])
        if key not in groups:
            models[key] = (model, shape)
        groups.setdefault(key, []).append(route)
    onnx_dir.mkdir(exist_ok=True)
    files = []
    for i, (key, (model, shape)) in enumerate(models.items()):
        path = onnx_dir / f"arch{i}_{'_'.join(groups[key])}.onnx"
        data = to_verified_onnx(model, shape).data
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        files.append(path)
    echo(f"routes: timing {len(files)} architectures in ONNX Runtime ({cfg.provider}), batches "
         f"{','.join(map(str, cfg.latency_batches))}")
    try:
        rep = bench_files([str(f) for f in files], batch=cfg.latency_batches, provider=cfg.provider,
                          threads=cfg.threads, warmup=cfg.warmup, runs=cfg.runs, progress=False)
    except SlimkitError as exc:
        raise SlimkitError(f"timing the routes' networks: {exc}") from exc
    p50: dict[str, dict[str, float]] = {}
    by_name = {f.name: key for f, key in zip(files, models)}
    for res in rep.results:
        for route in groups[by_name[Path(res.model).name]]:
            p50.setdefault(route, {})[str(res.batch)] = res.p50_ms
    return {"cost": cost, "p50_ms": p50, "provider": cfg.provider, "cpu": cpu_name(),
            "threads": rep.results[0].threads if rep.results else None}


def _rows(cfg: Any, records: list[dict[str, Any]], latency: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, label, slim in ROWS:
        recs = sorted((r for r in records if r["route"] == name), key=lambda r: r["seed"])
        if not recs:
            continue
        m, sd = mean_sd([r["test_acc"] for r in recs])
        best = max(recs, key=lambda r: (r["test_acc"], -r["seed"]))
        rows.append({"route": name, "label": label, "slim": slim, "spent": cfg.spent(name), "mean": m, "sd": sd,
                     "n": len(recs), "accs": [r["test_acc"] for r in recs], "seeds": [r["seed"] for r in recs],
                     **latency["cost"].get(name, {}), "p50_ms": latency["p50_ms"].get(name, {}),
                     "seed": best["seed"], "checkpoint": best["checkpoint"]})
    return rows


def _si(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def write_report(run, cfg: Any, records: list[dict[str, Any]], latency: dict[str, Any]) -> dict[str, Any]:
    """routes.md, routes.json and routes.png in the run directory; returns the report (rows and pick)."""
    import json

    rows = _rows(cfg, records, latency)
    slim_rows = [r for r in rows if r["slim"]]
    pick = max(slim_rows, key=lambda r: (r["mean"], -r["sd"])) if slim_rows else None
    batches = [str(b) for b in cfg.latency_batches]
    dense_p50 = next((r["p50_ms"] for r in rows if r["route"] == "dense"), {})
    head = ("| route | trained (epochs) | test accuracy % (n) | parameters | MACs | "
            + " | ".join(f"p50 ms b{b}" for b in batches) + " | speed-up b" + batches[0] + " |")
    lines = [f"# Routes to the slim network: {cfg.arch} on {cfg.data}, KELS split rate {cfg.split_rate:g}", "",
             f"Budget {cfg.budget} epochs: KE runs {cfg.generations} generations of {cfg.epochs}; prune fine-tunes "
             f"{cfg.finetune_epochs} epochs by {cfg.criterion} importance (lr {cfg.finetune_lr:g}); distill: weight "
             f"{cfg.kd_weight:g}, temperature {cfg.kd_temperature:g}. "
             + (f"{cfg.train_per_class} training images per class (subset seed {cfg.subset_seed}); "
                if cfg.train_per_class else "")
             + f"seeds {', '.join(map(str, cfg.seeds))}; accuracy on the test split, mean ± sd over the seeds.",
             f"Latency: ONNX Runtime {latency['provider']}, {latency['threads']} thread{'s' if latency['threads'] != 1 else ''}, {latency['cpu']}; one "
             "timing per distinct architecture (every slim route has the same widths).", "",
             head, "|---|---|---:|---:|---:|" + "---:|" * len(batches) + "---:|"]
    for r in rows:
        acc = f"{100 * r['mean']:.2f} ± {100 * r['sd']:.2f} ({r['n']})"
        lat = [f"{r['p50_ms'][b]:.3f}" if b in r["p50_ms"] else "" for b in batches]
        b0 = batches[0]
        speed = f"{dense_p50[b0] / r['p50_ms'][b0]:.2f}x" if b0 in dense_p50 and b0 in r["p50_ms"] else ""
        name = f"**{r['label']}**" if pick is not None and r is pick else r["label"]
        lines.append(f"| {name} | {r['spent']} | {acc} | {_si(r.get('params', 0))} | {_si(r.get('macs', 0))} | "
                     + " | ".join(lat) + f" | {speed} |")
    if pick is not None:
        runner_up = sorted(slim_rows, key=lambda r: -r["mean"])[1:2]
        lead = (f", {100 * (pick['mean'] - runner_up[0]['mean']):.2f} points above {runner_up[0]['label']}"
                if runner_up else "")
        lines += ["", f"Pick: **{pick['label']}**, {100 * pick['mean']:.2f}% ± {100 * pick['sd']:.2f}{lead}; "
                  f"`pick.pt` is its seed {pick['seed']} checkpoint (`slimkit export pick.pt`)."]
        if runner_up and pick["mean"] - runner_up[0]["mean"] < max(pick["sd"], runner_up[0]["sd"]):
            lines.append("The lead is smaller than the spread between seeds: more seeds would be needed to tell "
                         "these routes apart.")
    report = {"config": cfg.to_json(), "rows": rows, "pick": pick, "latency": latency, "markdown": "\n".join(lines)}
    run.write_text("routes.md", "\n".join(lines) + "\n")
    run.write_text("routes.json", json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=2) + "\n")
    run.write_figure("routes.png", plot_routes(rows, batches[0], f"{cfg.arch} on {cfg.data}, split rate {cfg.split_rate:g}"))
    return report


def plot_routes(rows: list[dict[str, Any]], batch: str, title: str = ""):
    """Test accuracy (mean ± sd) against p50 latency at ``batch``, one point per route."""
    from slimkit.core.plots import figure

    fig, ax = figure(size=(9, 4))
    for i, r in enumerate(rows):
        if batch not in r["p50_ms"]:
            continue
        x = r["p50_ms"][batch]
        ax.errorbar([x], [100 * r["mean"]], [100 * r["sd"]], marker="s" if r["slim"] else "o", capsize=3,
                    label=r["label"], linestyle="none")
        ax.annotate(r["route"], (x, 100 * r["mean"]), textcoords="offset points", xytext=(6, 4 - 9 * (i % 3)),
                    fontsize=8)
    ax.set_xlabel(f"p50 latency at batch {batch} (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside the axes: never over a point
    if title:
        ax.set_title(title, fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.66, bottom=0.13, top=0.9)
    return fig
