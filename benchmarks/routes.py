"""Which route gives the best slim network: `slimkit routes` on digits and glyphs at 10, 20 and 50 images a class.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/routes.py --data digits|glyphs \\
        [--sizes 10,20,50] [--seeds 0,1,2] [--epochs 20] [--budget 200] [--report]

Every cell (data, size, seed) is one `run_routes` run (cifar_resnet at 16 px, KELS split rate 0.5, the
verbs' defaults otherwise) in benchmarks/.runs/routes/ with seeds=(seed,) and the --train-per-class subset
drawn from the same seed, as benchmarks/claims_vs_data.py draws it: the spread over seeds includes which
images were drawn. A killed run continues where it stopped (each cell is a resumable run directory). Each
cell's rows are cached in benchmarks/results/routes_cells.json when it ends; `--report` (or the end of any
run) writes routes.md, routes.json and routes.png from the cached cells only (a cell not run is missing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import claims_vs_data  # noqa: E402  (its cell cache: the same cached, re-read-before-write file of results)

RESULTS = ROOT / "benchmarks" / "results"
CELLS = RESULTS / "routes_cells.json"
RUNS = ROOT / "benchmarks" / ".runs" / "routes"
ORDER = ("dense1", "dense", "ke_dense", "ke", "scratch", "prune", "distill")


def load_cells() -> dict:
    return claims_vs_data.load_cells(CELLS)


def save_cell(key: str, value: dict) -> None:
    claims_vs_data.save_cell(key, value, CELLS)  # re-reads first: another process may have written meanwhile


def data_root(data: str) -> str:
    """'digits', or the glyphs written once as an image folder under benchmarks/.runs (a fixed path: a
    resumed cell's recorded --data must name the same folder)."""
    if data == "digits":
        return "digits"
    folder = RUNS / "glyphs_data"
    if (folder / "test").is_dir():
        return str(folder)
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_glyphs", ROOT / "tools" / "make_glyphs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tmp = RUNS / ".glyphs_data.tmp"
    mod.write_folder(ROOT / "benchmarks" / "data" / "glyphs.npz", tmp)
    tmp.rename(folder)
    return str(folder)


def _suffix(epochs: int, budget: int, loss: str) -> str:
    return f"_e{epochs}_b{budget}" + ("" if loss == "ce" else f"_{loss}")


def _key(args, data: str, size: int, seed: int) -> str:
    return f"{data}_{size}_s{seed}" + _suffix(args.epochs, args.budget, args.loss)


def run_cell(root: str, data: str, size: int, seed: int, args) -> dict:
    from slimkit.methods.routes.run import RoutesConfig, run_routes

    out = RUNS / _key(args, data, size, seed)
    cfg = RoutesConfig(data=root, split_rate=0.5, budget=args.budget, epochs=args.epochs, seeds=(seed,),
                       train_per_class=size, subset_seed=seed, threads=1, runs=args.runs, warmup=5, loss=args.loss)
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    rep = run_routes(cfg, out, resume=(out / "config.json").is_file(), progress=False, echo=lambda s: None,
                     device="cpu", workers=0)
    return {"rows": {r["route"]: {"acc": r["accs"][0], "params": r.get("params"), "macs": r.get("macs"),
                                  "p50_ms": r["p50_ms"], "spent": r["spent"]} for r in rep["rows"]},
            "pick": rep["pick"]["route"], "seconds": time.time() - t0, "cpu": rep["latency"]["cpu"]}


LABELS = {"dense1": "dense N1", "dense": "dense, B epochs", "ke_dense": "KE dense N_G", "ke": "KE fit N_G",
          "scratch": "scratch", "prune": "prune + FT", "distill": "distill"}


VARIANTS = (  # (cell-key suffix, label): the default recipe first, then the recipe changes measured
    ("_e20_b200", "default: E = 20, B = 200, cross-entropy"),
    ("_e20_b200_smooth", "label smoothing 0.1 (every route), E = 20, B = 200"),
    ("_e100_b1000", "5x the steps per generation: E = 100, B = 1000 (10 generations, as before)"),
)
SLIM_ROUTES = ("ke", "scratch", "prune", "distill")


def _summary(cells: dict, data: str, size: int, suffix: str) -> dict | None:
    runs = [c for k, c in sorted(cells.items()) if k.startswith(f"{data}_{size}_s") and k.endswith(suffix)
            and k[len(f"{data}_{size}_s"):].split("_", 1)[1] == suffix[1:]]
    if not runs:
        return None
    means, sds = {}, {}
    for r in ORDER:
        accs = [100 * c["rows"][r]["acc"] for c in runs if r in c["rows"]]
        if accs:
            means[r] = statistics.mean(accs)
            sds[r] = statistics.stdev(accs) if len(accs) > 1 else 0.0
    slim = {r: means[r] for r in SLIM_ROUTES if r in means}
    best = max(slim, key=slim.get)
    wins = {r: sum(1 for c in runs if c["pick"] == r) for r in slim}
    return {"n": len(runs), "means": means, "sds": sds, "best": best, "wins": wins,
            "seconds": sum(c["seconds"] for c in runs), "cpu": sorted({c["cpu"] for c in runs})}


def _row(data: str, size: int, s: dict) -> str:
    cols = [f"{s['means'][r]:.1f} ± {s['sds'][r]:.1f}" if r in s["means"] else "" for r in ORDER]
    return (f"| {data} | {size} | {s['n']} | " + " | ".join(cols) + f" | {LABELS[s['best']]} | "
            + ", ".join(f"{LABELS[r]} {w}" for r, w in s["wins"].items() if w) + " |")


def report(args) -> None:
    cells = load_cells()
    head = ["| data | images/class | n | " + " | ".join(LABELS[r] for r in ORDER) + " | best slim (mean) | "
            "per-seed picks |", "|---|---:|---:|" + "---:|" * len(ORDER) + "---|---|"]
    lines = ["# Routes to the slim network (issue 21)", "",
             "cifar_resnet (depth 20, width 16) at 16 px, KELS split rate 0.5: every slim network has the same "
             "widths (68,642 of 272,186 parameters, 2.54 of 10.13 M MACs). Budget B epochs: KE runs B/E "
             "generations of E epochs and dense N1 is its first generation; dense and scratch train B epochs in one "
             "schedule; prune takes the dense network of the budget, cuts it by l1 importance to the KELS widths "
             "and fine-tunes E epochs (B + E in all); distill trains the slim network B epochs with the dense one "
             "as teacher (weight 0.5, T 4). Test accuracy (%), mean ± sd over seeds (n); each seed draws its own "
             "training subset (`--subset-seed` = seed, as `claims_vs_data.py`). Per-seed picks: how often each "
             "slim route was the most accurate of its cell. Generated by `benchmarks/routes.py --report` from the "
             "cached cells (`routes_cells.json`); the runs, `OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python "
             "benchmarks/routes.py` with `--data digits|glyphs` (default recipe), `--data digits|glyphs --sizes 10 "
             "--loss smooth` and `--data digits --sizes 10 --epochs 100 --budget 1000`.", ""]
    summary = {}
    for suffix, label in VARIANTS:
        rows, cpus, secs = [], set(), 0.0
        for data in ("digits", "glyphs"):
            for size in (10, 20, 50):
                s = _summary(cells, data, size, suffix)
                if s is None:
                    continue
                summary[f"{data}_{size}{suffix}"] = s
                rows.append(_row(data, size, s))
                cpus.update(s["cpu"])
                secs += s["seconds"]
        if not rows:
            continue
        lines += [f"## {label}", "", *head, *rows, "",
                  f"CPU: {', '.join(sorted(cpus))}, 1 thread per run, up to 6 runs (and a test suite) sharing 2 cores; "
                  f"{secs / 60:.0f} min of runs in all.", ""]
        if suffix != VARIANTS[0][0]:  # the same cells under the default recipe, for the comparison
            lines += ["Under the default recipe, the same cells:", ""]
            for key, s in summary.items():
                data, size = key.split("_")[0], int(key.split("_")[1])
                if key.endswith(VARIANTS[0][0]) and f"{data}_{size}{suffix}" in summary:
                    lines.append(f"- {data} {size}: " + ", ".join(
                        f"{LABELS[r]} {s['means'][r]:.1f} -> {summary[f'{data}_{size}{suffix}']['means'][r]:.1f}"
                        for r in ("dense", "ke", "scratch", "prune", "distill") if r in s["means"]))
            lines.append("")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "routes.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "routes.json").write_text(json.dumps(summary, indent=1) + "\n")
    _plot({k[: -len(VARIANTS[0][0])]: v for k, v in summary.items() if k.endswith(VARIANTS[0][0])})
    print("\n".join(lines))


def _plot(summary: dict) -> None:
    from slimkit.core.plots import figure

    fig, axes = figure(1, 2, size=(10, 3.8))
    for ax, data in zip(axes, ("digits", "glyphs")):
        sizes = [s for s in (10, 20, 50) if f"{data}_{s}" in summary]
        for r in ORDER:
            ys = [summary[f"{data}_{s}"]["means"].get(r) for s in sizes]
            if sizes and all(y is not None for y in ys):
                ax.plot(sizes, ys, marker="o", label=LABELS[r], linestyle="--" if r in ("dense1", "dense", "ke_dense") else "-")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([10, 20, 50], ["10", "20", "50"])
        ax.set_xlabel("training images per class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(data)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "routes.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("digits", "glyphs"), default="digits")
    ap.add_argument("--sizes", default="10,20,50")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=20, help="epochs of a KE generation (and dense N1)")
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--loss", default="ce", choices=("ce", "smooth"), help="every route's loss (a recipe change)")
    ap.add_argument("--runs", type=int, default=30, help="timed runs of each architecture")
    ap.add_argument("--report", action="store_true", help="only write the report from the cached cells")
    args = ap.parse_args()
    if not args.report:
        RUNS.mkdir(parents=True, exist_ok=True)
        root = data_root(args.data)
        for size in (int(s) for s in args.sizes.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                key = _key(args, args.data, size, seed)
                if key in load_cells():
                    continue
                cell = run_cell(root, args.data, size, seed, args)
                save_cell(key, cell)
                print(f"{key}: " + ", ".join(f"{r} {100 * v['acc']:.1f}" for r, v in cell["rows"].items())
                      + f"  [{cell['seconds']:.0f} s]", flush=True)
    report(args)


if __name__ == "__main__":
    main()
