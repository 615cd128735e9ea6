"""Merging on the bundled digits: teachers vs merged student vs one network trained as long.

    .venv/bin/python benchmarks/merge_digits.py [--pairs 3] [--teacher-epochs 30] [--gate-epochs 30]
        [--finetune-epochs 30] [--train-per-class 20] [--arch cifar_resnet] [--image-size 16]

For every seed pair (2k+1, 2k+2): `slimkit train` both teachers, `slimkit merge` them, and train a
single network of the same architecture from scratch (seed 100+k) for as many epochs as the whole
merge pipeline consumed (2 teachers + gate + fine-tune epochs). Every network sees the same seeded
training subset. Writes benchmarks/results/merge_digits.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from slimkit.engine.loop import TrainConfig
from slimkit.engine.train import TrainRunConfig, train
from slimkit.methods.merge.merging import MergeConfig, merge

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = [("teacher_a", "teacher A"), ("teacher_b", "teacher B"), ("better_teacher", "better teacher"),
        ("ensemble", "ensemble of both (2x params, 2x compute)"), ("big_student", "big student (concatenated)"),
        ("gated", "gated big student"), ("compressed", "compressed, before fine-tuning"),
        ("merged", "merged student (fine-tuned)"), ("single_long", "single network, same total epochs")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--gate-epochs", type=int, default=30)
    ap.add_argument("--finetune-epochs", type=int, default=30)
    ap.add_argument("--train-per-class", type=int, default=20)
    ap.add_argument("--arch", default="cifar_resnet")
    ap.add_argument("--image-size", type=int, default=16)
    args = ap.parse_args()
    tpc = args.train_per_class or None
    total = 2 * args.teacher_epochs + args.gate_epochs + args.finetune_epochs
    runs = []
    t0 = time.time()
    quiet = lambda s: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k in range(args.pairs):
            sa, sb = 2 * k + 1, 2 * k + 2
            for s in (sa, sb):
                train(TrainRunConfig(arch=args.arch, image_size=args.image_size, train_per_class=tpc, eval_every=10,
                                     train=TrainConfig(epochs=args.teacher_epochs, seed=s)),
                      tmp / f"t{s}", progress=False, echo=quiet)
            cfg = MergeConfig(train_per_class=tpc, eval_every=5,
                              gate=TrainConfig(epochs=args.gate_epochs, lr=0.01, batch_size=32, seed=k),
                              finetune=TrainConfig(epochs=args.finetune_epochs, lr=0.01, warmup_epochs=1,
                                                   batch_size=32, seed=k))
            r = merge(cfg, [tmp / f"t{sa}" / "last.pt", tmp / f"t{sb}" / "last.pt"], tmp / f"m{k}",
                      progress=False, echo=quiet)
            single = train(TrainRunConfig(arch=args.arch, image_size=args.image_size, train_per_class=tpc,
                                          eval_every=10, train=TrainConfig(epochs=total, seed=100 + k)),
                           tmp / f"single{k}", progress=False, echo=quiet)
            r = {**r, "better_teacher": max(r["teacher_a"], r["teacher_b"]), "single_long": single["test_acc"],
                 "seeds": [sa, sb], "single_seed": 100 + k}
            runs.append(r)
            print(f"pair {sa},{sb}: teachers {100 * r['teacher_a']:.2f} / {100 * r['teacher_b']:.2f}, ensemble "
                  f"{100 * r['ensemble']:.2f}, compressed {100 * r['compressed']:.2f}, merged {100 * r['merged']:.2f}, "
                  f"single {total} epochs {100 * r['single_long']:.2f}  [{time.time() - t0:.0f} s]", flush=True)
    sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)  # noqa: E731
    summary = {key: {"mean": statistics.fmean([100 * r[key] for r in runs]),
                     "std": sd([100 * r[key] for r in runs])} for key, _ in ROWS}
    wins = sum(r["merged"] > r["better_teacher"] for r in runs)
    wins_single = sum(r["merged"] > r["single_long"] for r in runs)
    cmd = (f"benchmarks/merge_digits.py --pairs {args.pairs} --teacher-epochs {args.teacher_epochs} "
           f"--gate-epochs {args.gate_epochs} --finetune-epochs {args.finetune_epochs} "
           f"--train-per-class {args.train_per_class} --arch {args.arch} --image-size {args.image_size}")
    minutes = (time.time() - t0) / 60
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "merge_digits.json").write_text(json.dumps(
        {"command": cmd, "seconds": time.time() - t0, "total_epochs_single": total, "summary": summary,
         "runs": runs}, indent=2) + "\n")
    lines = [f"# Merging two {args.arch} teachers on digits ({args.train_per_class or 'all'} training images per class)", "",
             f"Teachers: {args.teacher_epochs} epochs each (seeds 2k+1, 2k+2). Merge: {args.gate_epochs} gate epochs, "
             f"{args.finetune_epochs} fine-tune epochs, default `slimkit merge` settings. Single network: "
             f"{total} epochs (= 2 x {args.teacher_epochs} + {args.gate_epochs} + {args.finetune_epochs}). "
             f"Test split of 359 images. Reproduce: `.venv/bin/python {cmd}` ({minutes:.0f} min on 2 CPU cores).", "",
             f"| network | test acc, mean ± std over {len(runs)} seed pairs | parameters |", "|---|---:|---:|"]
    params = {"ensemble": 2 * runs[0]["teacher_params"], "big_student": None, "gated": None}
    for key, label in ROWS:
        p = params.get(key, runs[0]["teacher_params"])
        lines.append(f"| {label} | {summary[key]['mean']:.2f} ± {summary[key]['std']:.2f}% | "
                     f"{'4x' if p is None else f'{p:,}'} |")
    lines += ["", "Per pair:", "", "| seeds | teacher A | teacher B | ensemble | compressed | merged | single |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['seeds'][0]},{r['seeds'][1]} | {100 * r['teacher_a']:.2f} | {100 * r['teacher_b']:.2f} | "
              f"{100 * r['ensemble']:.2f} | {100 * r['compressed']:.2f} | {100 * r['merged']:.2f} | "
              f"{100 * r['single_long']:.2f} |" for r in runs]
    lines += ["", f"The merged student beats the better teacher in {wins} of {len(runs)} pairs "
              f"({summary['merged']['mean']:.2f}% vs {summary['better_teacher']['mean']:.2f}% on average) and the "
              f"single network trained for {total} epochs in {wins_single} of {len(runs)} "
              f"({summary['single_long']['mean']:.2f}%)."]
    (RESULTS / "merge_digits.md").write_text("\n".join(lines) + "\n")
    _plot(RESULTS / "merge_digits.png", summary, args)
    print("\n".join(lines))


def _plot(path: Path, summary: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["teacher_a", "teacher_b", "ensemble", "compressed", "merged", "single_long"]
    labels = ["teacher A", "teacher B", "ensemble", "compressed", "merged", "single\n(same epochs)"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(labels, [summary[k]["mean"] for k in keys], yerr=[summary[k]["std"] for k in keys], capsize=4,
           color=["#9bb", "#9bb", "#bbb", "#db9", "#d73", "#79c"])
    lo = min(summary[k]["mean"] - summary[k]["std"] for k in keys)
    ax.set_ylim(max(0, lo - 5), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"merging two {args.arch} teachers, digits ({args.train_per_class or 'all'} per class)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
