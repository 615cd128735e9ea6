"""The methods' claims against the training-set size: KE, merging and DEN at 10, 20, 50 images per class
and the full training split, on digits (bundled) and glyphs (letters A-J from fonts, an image folder).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/claims_vs_data.py \\
        --method ke|merge|den --data digits|glyphs [--sizes 10,20,50,all] [--seeds 0,1,2] [--report]

Every cell (method, data, size, seed) is one in-process run of `evolve` / `train` + `merge` / `run_den`;
its result is cached in benchmarks/results/claims_vs_data_cells.json as soon as it ends, so a killed run
continues where it stopped and the parts (method x data) run separately. `--report` (or the end of any
run) writes claims_vs_data.{md,json} and claims_{ke,merge,den}.png from the cached cells only: nothing
in the table is extrapolated; a cell not run is shown as missing.

Claims checked (test split of each set; the settings are the verbs' defaults unless stated):
  KE: the fit hypothesis of generation g (g = 5, 10) beats the dense network of generation 1, and
      against a single dense network trained for as many epochs as all g generations together;
  merging: the merged student beats both teachers, and a single network trained for all the epochs
      the merge consumed (2 teachers + gate + fine-tune);
  DEN (permuted:5): average accuracy close to one network per task (STL) with fewer parameters, above
      DNN-L2 and EWC; new-task accuracy R[t][t] and forgetting reported beside it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CELLS = RESULTS / "claims_vs_data_cells.json"
SIZES = ("10", "20", "50", "all")


def cpu_name() -> str:
    from slimkit.deploy.runners import cpu_name as name

    return name()


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_cells(path: Path = CELLS) -> dict:
    """The cached cells in ``path`` (benchmarks/routes.py keeps its own file)."""
    return json.loads(path.read_text()) if path.exists() else {}


def save_cell(key: str, value: dict, path: Path = CELLS) -> None:
    cells = load_cells(path)  # re-read: another part may have written meanwhile
    cells[key] = value
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cells, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def data_root(data: str, tmp: Path) -> str:
    if data == "digits":
        return "digits"
    return str(_tool("make_glyphs").write_folder(ROOT / "benchmarks" / "data" / "glyphs.npz", tmp / "glyphs"))


def _tpc(size: str) -> int | None:
    return None if size == "all" else int(size)


def ke_cell(root: str, size: str, seed: int, args, tmp: Path) -> dict:
    """One KE run of G generations (dense and fit accuracy at each generation's end) and the budget-matched
    single networks: one dense network trained g x E epochs in one schedule for every reported g."""
    from slimkit.engine.loop import TrainConfig
    from slimkit.engine.train import TrainRunConfig, train
    from slimkit.methods.ke.evolve import EvolveConfig, evolve

    quiet = lambda s: None  # noqa: E731
    G, E = max(args.ke_generations), args.ke_epochs
    t0 = time.time()
    recs = evolve(EvolveConfig(data=root, generations=G, train_per_class=_tpc(size), subset_seed=seed, eval_every=E,
                               train=TrainConfig(epochs=E, seed=seed)), tmp / "ke", progress=False, echo=quiet, workers=0)
    out = {"dense": [r["dense_acc"] for r in recs], "fit": [r["fit_acc"] for r in recs], "epochs": E}
    for g in args.ke_generations:
        # the subset is seed's (as recorded: evolve drew it from --seed before --subset-seed): the same images
        r = train(TrainRunConfig(data=root, train_per_class=_tpc(size), subset_seed=seed, eval_every=g * E,
                                 train=TrainConfig(epochs=g * E, seed=seed)), tmp / f"single{g}", progress=False,
                  echo=quiet, workers=0)
        out[f"single_{g}"] = r["test_acc"]
    out["seconds"] = time.time() - t0
    return out


def merge_cell(root: str, size: str, seed: int, args, tmp: Path) -> dict:
    """Two teachers (seeds 2s+1, 2s+2), their merge at the default settings, and a single network trained
    for 2 x teacher + gate + fine-tune epochs; all on the same seeded subset."""
    from slimkit.engine.loop import TrainConfig
    from slimkit.engine.train import TrainRunConfig, train
    from slimkit.methods.merge.merging import MergeConfig, merge

    quiet = lambda s: None  # noqa: E731
    te = args.teacher_epochs
    base = MergeConfig()
    total = 2 * te + base.gate.epochs + base.finetune.epochs
    t0 = time.time()
    sa, sb = 2 * seed + 1, 2 * seed + 2
    for s in (sa, sb):
        train(TrainRunConfig(data=root, train_per_class=_tpc(size), subset_seed=seed, eval_every=te,
                             train=TrainConfig(epochs=te, seed=s)), tmp / f"t{s}", progress=False, echo=quiet, workers=0)
    r = merge(MergeConfig(data=root, train_per_class=_tpc(size), subset_seed=seed, eval_every=1000),
              [tmp / f"t{sa}" / "last.pt", tmp / f"t{sb}" / "last.pt"], tmp / "m", progress=False, echo=quiet)
    single = train(TrainRunConfig(data=root, train_per_class=_tpc(size), subset_seed=seed, eval_every=total,
                                  train=TrainConfig(epochs=total, seed=100 + seed)), tmp / "single", progress=False,
                   echo=quiet, workers=0)
    return {**{k: r[k] for k in ("teacher_a", "teacher_b", "ensemble", "compressed", "merged")},
            "single": single["test_acc"], "single_epochs": total, "seconds": time.time() - t0}


DEN_VARIANTS = {
    # the settings before issue 14: the paper's training-loss rule for expansion
    "den_train_tau": {"expand_on": "train"},
    # the defaults now (validation criterion; see slimkit den --help)
    "den": {},
    # ablation: the same held-out share, but the rule never fires (what the expansion itself buys)
    "den_val_never": {"expand_on": "val", "tau_val": 1.0},
}


def den_cell(root: str, size: str, seed: int, args, tmp: Path, have: dict | None = None) -> dict:
    """DEN on permuted:5 (each variant of DEN_VARIANTS not in ``have``) and, in the first run, its baselines."""
    import torch

    from slimkit.methods.den.config import DENConfig
    from slimkit.methods.den.sequence import run_den

    out, t0 = dict(have or {}), time.time()
    for i, (name, over) in enumerate(DEN_VARIANTS.items()):
        if (over and not _has_fields(DENConfig, over)) or name in out:
            continue
        torch.manual_seed(seed)
        cfg = DENConfig(data=root, tasks=args.den_tasks, train_per_class=_tpc(size), seed=seed, subset_seed=seed,
                        baselines=("dnn-l2", "ewc", "stl") if i == 0 else (), **over)
        s = run_den(cfg, tmp / name, progress=False, echo=lambda m: None)
        for k, v in s["results"].items():
            key = name if k == "den" else k
            out[key] = {"average": v["average"], "forgetting": v["forgetting"], "params": v["params"],
                        "new_task": [v["R"][t][t] for t in range(len(v["R"]))]}
        out[name]["expanded"] = [bool(r["expanded"]) for r in s["den_tasks"]]
        out[name]["added"] = [r["added"] for r in s["den_tasks"]]
    out["seconds"] = out.get("seconds", 0) + time.time() - t0
    return out


def _has_fields(cls, over: dict) -> bool:
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return all(k in names for k in over)


CELL = {"ke": ke_cell, "merge": merge_cell, "den": den_cell}


# --- report -----------------------------------------------------------------------------------------------

def _ms(xs: list[float]) -> str:
    if not xs:
        return "–"
    return f"{100 * statistics.fmean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{100 * xs[0]:.1f}"


def _group(cells: dict, method: str, data: str, size: str) -> list[dict]:
    pre = f"{method}/{data}/{size}/"
    return [v for k, v in sorted(cells.items()) if k.startswith(pre)]


def report(cells: dict, commands: list[str]) -> None:
    import platform

    lines = ["# Claims against the training-set size (issue 14)", "",
             "Test accuracy (%), mean ± sd over the seeds run (n = seeds); `all` is the full training split "
             "(digits: every training image; glyphs: 158 fonts a class). Generated from the cached cells by "
             "`benchmarks/claims_vs_data.py --report`; the runs: " + "; ".join(f"`{c}`" for c in commands) + ".",
             f"CPU: {cpu_name()}, 1 thread per run ({platform.python_version()}).", ""]
    js: dict = {"commands": commands, "cpu": cpu_name(), "ke": {}, "merge": {}, "den": {}}
    lines += ["## Knowledge Evolution (cifar_resnet 16x16, KELS sr 0.5, fit hypothesis = 25% of the parameters)", "",
              "| data | images/class | n | dense N1 | dense N5 | fit N5 | single, 5E epochs | dense N10 | fit N10 | "
              "single, 10E epochs | fit N10 > N1? | fit N10 > single 10E? |", "|---|---:|---:|" + "---:|" * 9]
    for data in ("digits", "glyphs"):
        for size in SIZES:
            g = _group(cells, "ke", data, size)
            if not g:
                continue
            row = {"n": len(g), "epochs_per_generation": g[0]["epochs"]}
            for key, vals in (("dense_n1", [c["dense"][0] for c in g]), ("dense_n5", [c["dense"][4] for c in g]),
                              ("fit_n5", [c["fit"][4] for c in g]), ("single_5", [c["single_5"] for c in g]),
                              ("dense_n10", [c["dense"][9] for c in g]), ("fit_n10", [c["fit"][9] for c in g]),
                              ("single_10", [c["single_10"] for c in g])):
                row[key] = vals
            js["ke"][f"{data}/{size}"] = row
            m = lambda k: statistics.fmean(row[k])  # noqa: E731
            lines.append(f"| {data} | {size} | {len(g)} | " + " | ".join(_ms(row[k]) for k in (
                "dense_n1", "dense_n5", "fit_n5", "single_5", "dense_n10", "fit_n10", "single_10"))
                + f" | {'yes' if m('fit_n10') > m('dense_n1') else 'no'} | {'yes' if m('fit_n10') > m('single_10') else 'no'} |")
    e = next((r["epochs_per_generation"] for r in js["ke"].values()), None)
    lines += ["", f"E = {e} epochs per generation; the single networks train 5E and 10E epochs in one schedule "
              "(warm-up + cosine), on the same seeded subset as KE.", ""]
    lines += ["## Merging (two cifar_resnet teachers, default `slimkit merge`)", "",
              "| data | images/class | n | teacher A | teacher B | ensemble (2x) | merged student | single, same epochs | "
              "merged > both teachers | merged > single |", "|---|---:|---:|" + "---:|" * 7]
    for data in ("digits", "glyphs"):
        for size in SIZES:
            g = _group(cells, "merge", data, size)
            if not g:
                continue
            row = {k: [c[k] for c in g] for k in ("teacher_a", "teacher_b", "ensemble", "merged", "single")}
            row["n"] = len(g)
            js["merge"][f"{data}/{size}"] = row
            beat_t = sum(c["merged"] > max(c["teacher_a"], c["teacher_b"]) for c in g)
            beat_s = sum(c["merged"] > c["single"] for c in g)
            lines.append(f"| {data} | {size} | {len(g)} | " + " | ".join(_ms(row[k]) for k in (
                "teacher_a", "teacher_b", "ensemble", "merged", "single")) + f" | {beat_t}/{len(g)} | {beat_s}/{len(g)} |")
    se = next((c["single_epochs"] for k, c in cells.items() if k.startswith("merge/")), None)
    lines += ["", f"Single network: {se} epochs (2 teachers + gate + fine-tune), seed 100+s.", ""]
    lines += ["## DEN (permuted:5, MLP 312-128)", "",
              "Average accuracy after the last task; new task = mean over tasks of R[t][t] (accuracy on task t "
              "right after learning it); forgetting = mean over t < T of R[t][t] - R[T][t]; parameters as % of "
              "STL's (five networks). `DEN, train loss > tau` is the rule before issue 14; `DEN (now)` the defaults "
              "(val rule); `held out but never expanding` is the val rule with tau_val 1: the same 20% held out, "
              "no expansion, so `now` minus it is what the expansion buys.", "",
              "| data | images/class | n | method | average | new task | forgetting | params (% STL) | expanded at tasks |",
              "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    names = {"den_train_tau": "DEN, train loss > tau (before)", "den": "DEN (now)",
             "den_val_never": "DEN, held out but never expanding", "stl": "STL",
             "dnn-l2": "DNN-L2", "ewc": "EWC"}
    for data in ("digits", "glyphs"):
        for size in SIZES:
            g = _group(cells, "den", data, size)
            if not g:
                continue
            for m, label in names.items():
                gm = [c for c in g if m in c]
                if not gm:
                    continue
                stl = statistics.fmean(c["stl"]["params"] for c in gm)
                row = {"n": len(gm), "average": [c[m]["average"] for c in gm],
                       "new_task": [statistics.fmean(c[m]["new_task"]) for c in gm],
                       "forgetting": [c[m]["forgetting"] for c in gm],
                       "params": statistics.fmean(c[m]["params"] for c in gm), "params_stl": stl}
                exp = ""
                if "expanded" in gm[0][m]:
                    row["expanded"] = [c[m]["expanded"] for c in gm]
                    exp = " / ".join(",".join(str(t + 1) for t, x in enumerate(c[m]["expanded"]) if x) or "none"
                                     for c in gm)
                js["den"][f"{data}/{size}/{m}"] = row
                lines.append(f"| {data} | {size} | {len(gm)} | {label} | {_ms(row['average'])} | {_ms(row['new_task'])} | "
                             f"{_ms(row['forgetting'])} | {100 * row['params'] / stl:.0f}% | {exp} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "claims_vs_data.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "claims_vs_data.json").write_text(json.dumps(js, indent=1) + "\n")
    _plots(js)
    print("\n".join(lines))


def _plots(js: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_of = {s: i for i, s in enumerate(SIZES)}
    series = {"ke": [("dense_n1", "dense N1", "--"), ("fit_n5", "fit N5", "-"), ("fit_n10", "fit N10", "-"),
                     ("single_10", "single, 10E epochs", ":")],
              "merge": [("teacher_a", "teacher A", "--"), ("merged", "merged student", "-"),
                        ("single", "single, same epochs", ":")]}
    for method in ("ke", "merge", "den"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
        for ax, data in zip(axes, ("digits", "glyphs")):
            if method == "den":
                keys = [("den_train_tau", "DEN, train loss > tau (before)", "--"), ("den", "DEN (now)", "-"),
                        ("stl", "STL", ":"), ("dnn-l2", "DNN-L2", "-."), ("ewc", "EWC", "-.")]
                for i, (k, label, ls) in enumerate(keys):
                    pts = [(x_of[s], js["den"][f"{data}/{s}/{k}"]["average"]) for s in SIZES if f"{data}/{s}/{k}" in js["den"]]
                    if pts:
                        xs, ys = zip(*pts)
                        ax.errorbar(xs, [100 * statistics.fmean(v) for v in ys],
                                    [100 * statistics.stdev(v) if len(v) > 1 else 0 for v in ys], ls=ls, marker="o",
                                    capsize=2, label=label, color=f"C{i}")
                ax.set_ylabel("average accuracy, permuted:5 (%)")
            else:
                for i, (k, label, ls) in enumerate(series[method]):
                    pts = [(x_of[s], js[method][f"{data}/{s}"][k]) for s in SIZES if f"{data}/{s}" in js[method]]
                    if pts:
                        xs, ys = zip(*pts)
                        ax.errorbar(xs, [100 * statistics.fmean(v) for v in ys],
                                    [100 * statistics.stdev(v) if len(v) > 1 else 0 for v in ys], ls=ls, marker="o",
                                    capsize=2, label=label, color=f"C{i}")
                ax.set_ylabel("test accuracy (%)")
            ax.set_xticks(range(len(SIZES)), SIZES)
            ax.set_xlabel("training images per class")
            ax.set_title(f"{method.upper()} on {data}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / f"claims_{method}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Run with OMP_NUM_THREADS=1; cells already in the cache are skipped.")
    ap.add_argument("--method", choices=tuple(CELL), help="which part to run (none: only --report)")
    ap.add_argument("--data", choices=("digits", "glyphs"), default="digits")
    ap.add_argument("--sizes", default="10,20,50,all", help="images per class, 'all' = full training split")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ke-epochs", type=int, default=20, help="KE epochs per generation E (default 20, as "
                    "benchmarks/ke_folders.py: what fits the time; 10 left N1 at chance at 10 images per class)")
    ap.add_argument("--ke-generations", default="5,10", help="generations reported (the run goes to the largest)")
    ap.add_argument("--teacher-epochs", type=int, default=30, help="merge: epochs of each teacher")
    ap.add_argument("--den-tasks", default="permuted:5")
    ap.add_argument("--redo", action="store_true", help="rerun cells already cached")
    ap.add_argument("--report", action="store_true", help="write the table and plots from the cache")
    args = ap.parse_args()
    args.ke_generations = [int(g) for g in args.ke_generations.split(",")]
    if args.method:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            root = data_root(args.data, tmp)
            for size in args.sizes.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    key = f"{args.method}/{args.data}/{size}/{seed}"
                    have = None if args.redo else load_cells().get(key)
                    if have is not None and (args.method != "den" or all(v in have for v in DEN_VARIANTS)):
                        continue
                    cell_tmp = tmp / key.replace("/", "_")
                    cell_tmp.mkdir()
                    t0 = time.time()
                    res = (den_cell(root, size, seed, args, cell_tmp, have) if args.method == "den"
                           else CELL[args.method](root, size, seed, args, cell_tmp))
                    res["command"] = (f"benchmarks/claims_vs_data.py --method {args.method} --data {args.data} "
                                      f"--sizes {size} --seeds {seed}"
                                      + (f" --ke-epochs {args.ke_epochs}" if args.method == "ke" else "")
                                      + (f" --teacher-epochs {args.teacher_epochs}" if args.method == "merge" else ""))
                    save_cell(key, res)
                    print(f"{key}: {time.time() - t0:.0f} s {json.dumps({k: v for k, v in res.items() if k != 'command'})[:300]}",
                          flush=True)
    cells = load_cells()
    commands = sorted({c.get("command", "").rsplit(" --sizes", 1)[0] for c in cells.values()} - {""})
    report(cells, [f"OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python {c} --sizes ... --seeds ..." for c in commands])


if __name__ == "__main__":
    main()
