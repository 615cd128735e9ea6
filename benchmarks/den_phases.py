"""Where DEN loses a new task's accuracy: task t's test accuracy after every training phase of its step.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/den_phases.py [--sizes 10,50] [--seed 0]
        [--rules train,val]

permuted:5 on digits, default `slimkit den` settings apart from the expansion rule; every call of
`slimkit.methods.den.steps.train_task` on the DEN network is followed by task t's test accuracy (a
diagnostic: nothing is chosen from it). Writes benchmarks/results/den_phases.{md,json}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _phase(t: int, pen, epochs: int, full: int) -> str:
    if t == 1:
        return "task 1"
    if pen.group:
        return "expansion"
    if pen.l2_to:
        return "split retraining" if epochs == full else "retraining after the split"
    if pen.l2:
        return "selective retraining"
    return "head alone"


def run(size: int | None, seed: int, rule: str) -> list[dict]:
    from slimkit.methods.den import sequence as S
    from slimkit.methods.den import steps as D
    from slimkit.methods.den.baselines import new_net
    from slimkit.methods.den.config import DENConfig
    from slimkit.methods.den.tasks import make_tasks, score

    cfg = DENConfig(tasks="permuted:5", train_per_class=size, seed=seed, subset_seed=seed, expand_on=rule, baselines=())
    tasks = make_tasks(cfg.tasks, cfg.data, cfg.image_size, cfg.seed, cfg.train_per_class, cfg.subset_seed)
    net = new_net(cfg, (), cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    rows: list[dict] = []
    orig = D.train_task

    def fit(m, t, data, masks, epochs, lr=0.01, batch_size=32, penalties=None, seed=0):
        loss = orig(m, t, data, masks, epochs, lr, batch_size, penalties, seed)
        if m is net:  # not the reference network of the val rule
            rows[-1]["phases"].append({"phase": _phase(t, penalties, epochs, cfg.epochs), "train_loss": loss,
                                       "test_acc": score(m, t, tasks[t - 1])})
        return loss

    D.train_task = fit
    try:
        for t, task in enumerate(tasks, 1):
            rows.append({"task": t, "phases": []})
            rec = S._den_task(net, t, task, cfg, gen)
            rows[-1].update(final=score(net, t, task), expanded=rec["expanded"], duplicated=rec["duplicated"],
                            selected=rec["selected"])
    finally:
        D.train_task = orig
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,50", help="images per class ('all' = every training image)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rules", default="train,val")
    args = ap.parse_args()
    out, lines = {}, ["# DEN: task t's test accuracy after each phase of its step (digits, permuted:5)", "",
                      f"Reproduce: `OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/den_phases.py --sizes "
                      f"{args.sizes} --seed {args.seed} --rules {args.rules}`. Default settings apart from the "
                      "expansion rule; accuracy (%) on task t's test images, train loss in brackets.", ""]
    for size in args.sizes.split(","):
        for rule in args.rules.split(","):
            rows = run(None if size == "all" else int(size), args.seed, rule)
            out[f"{size}/{rule}"] = rows
            lines += [f"## {size} images per class, expand_on {rule}", "",
                      "| task | phases in order: test acc (train loss) | final | duplicated | expanded |", "|---:|---|---:|---:|---|"]
            for r in rows:
                ph = "; ".join(f"{p['phase']} {100 * p['test_acc']:.1f} ({p['train_loss']:.3f})" for p in r["phases"])
                lines.append(f"| {r['task']} | {ph} | {100 * r['final']:.1f} | {r['duplicated']} | {r['expanded']} |")
            lines.append("")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "den_phases.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "den_phases.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
