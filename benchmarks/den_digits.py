"""DEN against its baselines on digits task sequences, over seeds, with a sweep of the split threshold.

    .venv/bin/python benchmarks/den_digits.py [--seeds 0,1,2] [--tasks split,permuted:5]
        [--sigmas 0.1,0.15,0.2,0.3] [--taus 0.05] [--epochs 30] [--name den_digits]

For every task sequence and seed, one `slimkit den` run trains DEN (first sigma) and the baselines
DNN, DNN-L2, EWC, DNN-STL and DNN-MTL on the same tasks; each further sigma adds a DEN-only run,
and so does each further expansion threshold tau (at the first sigma; tau 0 expands at every task).
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

from slimkit.methods.den.config import DENConfig
from slimkit.methods.den.sequence import run_den

RESULTS = Path(__file__).resolve().parent / "results"


def _ms(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.2f} ± {sd:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default="split,permuted:5")
    ap.add_argument("--sigmas", default="0.1,0.15,0.2,0.3")
    ap.add_argument("--taus", default="0.05", help="expansion thresholds; the first one goes with every sigma")
    ap.add_argument("--name", default="den_digits", help="results file stem under benchmarks/results/")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--expand-on", default="train", choices=("train", "val"),
                    help="expansion rule; train (the paper's, the default before issue 14) reproduces the recorded "
                    "results; `slimkit den` now defaults to val (see claims_vs_data.py)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    sigmas = [float(s) for s in args.sigmas.split(",")]
    taus = [float(t) for t in args.taus.split(",")]
    variants = [(sg, taus[0]) for sg in sigmas] + [(sigmas[0], t) for t in taus[1:]]
    specs = args.tasks.split(",")
    t0 = time.time()
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            for seed in seeds:
                for i, (sigma, tau) in enumerate(variants):
                    torch.manual_seed(seed)
                    cfg = DENConfig(tasks=spec, epochs=args.epochs, sigma=sigma, tau=tau, seed=seed, expand_on=args.expand_on,
                                    baselines=DENConfig.baselines if i == 0 else ())
                    s = run_den(cfg, Path(tmp) / f"{spec.replace(':', '_')}_{seed}_{sigma}_{tau}", progress=False,
                                echo=lambda m: None)
                    runs.setdefault(spec, []).append({"seed": seed, "sigma": sigma, "tau": tau, "metric": s["metric"],
                                                      "results": {k: {kk: v[kk] for kk in ("average", "forgetting", "params", "nonzero")}
                                                                  for k, v in s["results"].items()},
                                                      "den_tasks": s["den_tasks"]})
                    d = s["results"]["den"]
                    print(f"{spec} seed {seed} sigma {sigma} tau {tau}: DEN {100 * d['average']:.2f} (forgetting "
                          f"{100 * d['forgetting']:.2f}, {d['params']:,} params)  [{time.time() - t0:.0f} s]", flush=True)
    cmd = (f"benchmarks/den_digits.py --seeds {args.seeds} --tasks {args.tasks} --sigmas {args.sigmas} "
           + (f"--taus {args.taus} " if len(taus) > 1 or taus[0] != 0.05 else "")
           + f"--epochs {args.epochs} --name {args.name}" + (" --expand-on val" if args.expand_on == "val" else ""))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": cmd, "seconds": time.time() - t0, "runs": runs}, indent=2) + "\n")
    lines = ["# DEN vs baselines on digits (MLP 312-128)", "",
             f"Seeds {args.seeds}; {args.epochs} epochs per task and phase; default `slimkit den` settings apart from "
             f"sigma and tau. Reproduce: `.venv/bin/python {cmd}` ({(time.time() - t0) / 60:.0f} min on 2 CPU cores).", ""]
    for spec in specs:
        rs = runs[spec]
        base = [r for r in rs if (r["sigma"], r["tau"]) == variants[0]]
        stl = [r["results"]["stl"]["params"] for r in base]
        lines += [f"## {spec} ({rs[0]['metric']})", "",
                  "| method | average (mean ± std) | forgetting | parameters | of STL's | non-zero parameters | expanded at tasks |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        rows = [(f"DEN sigma {sg:g}" + (f" tau {t:g}" if len(taus) > 1 else ""),
                 [r for r in rs if (r["sigma"], r["tau"]) == (sg, t)], "den") for sg, t in variants]
        rows += [(m.upper(), base, m) for m in ("dnn", "dnn-l2", "ewc", "stl", "mtl")]
        for label, group, key in rows:
            av = [100 * r["results"][key]["average"] for r in group]
            fg = [100 * r["results"][key]["forgetting"] for r in group if r["results"][key]["forgetting"] is not None]
            pa = [r["results"][key]["params"] for r in group]
            share = statistics.fmean(p / s for p, s in zip(pa, stl))
            nz = statistics.fmean(r["results"][key].get("nonzero", 0) for r in group)
            expanded = (f"{statistics.fmean(sum(t['expanded'] for t in r['den_tasks']) for r in group):.1f}"
                        if key == "den" else "")
            lines.append(f"| {label} | {_ms(av)} | {_ms(fg) if fg else ''} | {statistics.fmean(pa):,.0f} | "
                         f"{100 * share:.0f}% | {nz:,.0f} | {expanded} |")
        lines.append("")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    _plot(RESULTS / f"{args.name}.png", runs, variants, specs)
    print("\n".join(lines))


def _plot(path: Path, runs: dict, variants: list[tuple[float, float]], specs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(specs), figsize=(5 * len(specs), 3.8), squeeze=False)
    for ax, spec in zip(axes[0], specs):
        rs = runs[spec]
        base = [r for r in rs if (r["sigma"], r["tau"]) == variants[0]]
        stl = statistics.fmean(r["results"]["stl"]["params"] for r in base)
        for key, marker in (("dnn", "o"), ("dnn-l2", "s"), ("ewc", "^"), ("stl", "D"), ("mtl", "v")):
            ax.scatter([100 * statistics.fmean(r["results"][key]["params"] for r in base) / stl],
                       [100 * statistics.fmean(r["results"][key]["average"] for r in base)], marker=marker, label=key.upper())
        def point(v):
            group = [r for r in rs if (r["sigma"], r["tau"]) == v]
            return (100 * statistics.fmean(r["results"]["den"]["params"] for r in group) / stl,
                    100 * statistics.fmean(r["results"]["den"]["average"] for r in group))

        sweep = [v for v in variants if v[1] == variants[0][1]]
        xs, ys = zip(*(point(v) for v in sweep))
        ax.plot(xs, ys, "k-o", label="DEN (sigma sweep)")
        for x, y, (sg, _) in zip(xs, ys, sweep):
            ax.annotate(f"σ={sg:g}", (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
        for v in variants[len(sweep):]:
            x, y = point(v)
            ax.scatter([x], [y], marker="*", s=80, label=f"DEN τ={v[1]:g}")
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
