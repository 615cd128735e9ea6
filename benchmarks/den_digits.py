"""DEN against its baselines on digits task sequences, over seeds, with a sweep of the split threshold.

    .venv/bin/python benchmarks/den_digits.py [--seeds 0,1,2] [--tasks split,permuted:5]
        [--sigmas 0.1,0.15,0.2,0.3] [--epochs 30] [--name den_digits]

For every task sequence and seed, one `slimkit den` run trains DEN (first sigma) and the baselines
DNN, DNN-L2, EWC, DNN-STL and DNN-MTL on the same tasks; each further sigma adds a DEN-only run.
Writes benchmarks/results/NAME.{md,json,png} (default den_digits).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slimkit.training.den import DENConfig, run_den

RESULTS = Path(__file__).resolve().parent / "results"


def _ms(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.2f} ± {sd:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default="split,permuted:5")
    ap.add_argument("--sigmas", default="0.1,0.15,0.2,0.3")
    ap.add_argument("--name", default="den_digits", help="results file stem under benchmarks/results/")
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    sigmas = [float(s) for s in args.sigmas.split(",")]
    specs = args.tasks.split(",")
    t0 = time.time()
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            for seed in seeds:
                for i, sigma in enumerate(sigmas):
                    torch.manual_seed(seed)
                    cfg = DENConfig(tasks=spec, epochs=args.epochs, sigma=sigma, seed=seed,
                                    baselines=DENConfig.baselines if i == 0 else ())
                    s = run_den(cfg, Path(tmp) / f"{spec.replace(':', '_')}_{seed}_{sigma}", progress=False,
                                echo=lambda m: None)
                    runs.setdefault(spec, []).append({"seed": seed, "sigma": sigma, "metric": s["metric"],
                                                      "results": {k: {kk: v[kk] for kk in ("average", "forgetting", "params", "nonzero")}
                                                                  for k, v in s["results"].items()},
                                                      "den_tasks": s["den_tasks"]})
                    d = s["results"]["den"]
                    print(f"{spec} seed {seed} sigma {sigma}: DEN {100 * d['average']:.2f} (forgetting "
                          f"{100 * d['forgetting']:.2f}, {d['params']:,} params)  [{time.time() - t0:.0f} s]", flush=True)
    cmd = (f"benchmarks/den_digits.py --seeds {args.seeds} --tasks {args.tasks} --sigmas {args.sigmas} "
           f"--epochs {args.epochs} --name {args.name}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": cmd, "seconds": time.time() - t0, "runs": runs}, indent=2) + "\n")
    lines = ["# DEN vs baselines on digits (MLP 312-128)", "",
             f"Seeds {args.seeds}; {args.epochs} epochs per task and phase; default `slimkit den` settings apart from "
             f"sigma. Reproduce: `.venv/bin/python {cmd}` ({(time.time() - t0) / 60:.0f} min on 2 CPU cores).", ""]
    for spec in specs:
        rs = runs[spec]
        base = [r for r in rs if r["sigma"] == sigmas[0]]
        stl = [r["results"]["stl"]["params"] for r in base]
        lines += [f"## {spec} ({rs[0]['metric']})", "",
                  "| method | average (mean ± std) | forgetting | parameters | of STL's | non-zero parameters |",
                  "|---|---:|---:|---:|---:|---:|"]
        rows = [(f"DEN sigma {sg:g}", [r for r in rs if r["sigma"] == sg], "den") for sg in sigmas]
        rows += [(m.upper(), base, m) for m in ("dnn", "dnn-l2", "ewc", "stl", "mtl")]
        for label, group, key in rows:
            av = [100 * r["results"][key]["average"] for r in group]
            fg = [100 * r["results"][key]["forgetting"] for r in group if r["results"][key]["forgetting"] is not None]
            pa = [r["results"][key]["params"] for r in group]
            share = statistics.fmean(p / s for p, s in zip(pa, stl))
            nz = statistics.fmean(r["results"][key].get("nonzero", 0) for r in group)
            lines.append(f"| {label} | {_ms(av)} | {_ms(fg) if fg else ''} | {statistics.fmean(pa):,.0f} | "
                         f"{100 * share:.0f}% | {nz:,.0f} |")
        lines.append("")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    _plot(RESULTS / f"{args.name}.png", runs, sigmas, specs)
    print("\n".join(lines))


def _plot(path: Path, runs: dict, sigmas: list[float], specs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(specs), figsize=(5 * len(specs), 3.8), squeeze=False)
    for ax, spec in zip(axes[0], specs):
        rs = runs[spec]
        base = [r for r in rs if r["sigma"] == sigmas[0]]
        stl = statistics.fmean(r["results"]["stl"]["params"] for r in base)
        for key, marker in (("dnn", "o"), ("dnn-l2", "s"), ("ewc", "^"), ("stl", "D"), ("mtl", "v")):
            ax.scatter([100 * statistics.fmean(r["results"][key]["params"] for r in base) / stl],
                       [100 * statistics.fmean(r["results"][key]["average"] for r in base)], marker=marker, label=key.upper())
        xs = [100 * statistics.fmean(r["results"]["den"]["params"] for r in rs if r["sigma"] == sg) / stl for sg in sigmas]
        ys = [100 * statistics.fmean(r["results"]["den"]["average"] for r in rs if r["sigma"] == sg) for sg in sigmas]
        ax.plot(xs, ys, "k-o", label="DEN (sigma sweep)")
        for x, y, sg in zip(xs, ys, sigmas):
            ax.annotate(f"σ={sg:g}", (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
        ax.set_xlabel("parameters (% of STL)")
        ax.set_ylabel(f"average {rs[0]['metric']} (%)")
        ax.set_title(spec)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
