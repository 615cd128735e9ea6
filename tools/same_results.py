"""Bit-identity check for refactors of the training code: the same short runs before and after a change.

    PYTHONPATH=. .venv/bin/python tools/same_results.py runs/before      # on the old commit
    PYTHONPATH=. .venv/bin/python tools/same_results.py runs/after       # on the new one
    PYTHONPATH=. .venv/bin/python tools/same_results.py --compare runs/before runs/after

Runs, on one thread and the bundled digits, a few epochs of train (mlp; cifar_resnet with CS-KD;
two small_vgg teachers), evolve (KELS 3 generations; WELS with label smoothing), merge (the two
teachers) and den (MLP split:3 with every baseline; a conv net split:2 that expands). ``--compare``
asserts every checkpoint equal with ``torch.equal`` (the same computation rerun on the same machine)
and the metrics (timings and paths aside) and summaries equal; exit status 1 names what differs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

IGNORED = ("seconds", "train_seconds", "teacher_paths")  # timings, and the teachers' absolute paths


def runs(out: Path) -> None:
    from slimkit.engine.loop import TrainConfig
    from slimkit.engine.train import TrainRunConfig, train
    from slimkit.methods.den.config import DENConfig
    from slimkit.methods.den.sequence import run_den
    from slimkit.methods.ke.evolve import EvolveConfig, evolve
    from slimkit.methods.merge.merging import MergeConfig, merge

    q = dict(progress=False, echo=lambda s: None, device="cpu")  # the library's default is auto
    out.mkdir(parents=True)
    torch.set_num_threads(1)
    train(TrainRunConfig(arch="mlp", image_size=8, train_per_class=5, eval_every=2,
                         train=TrainConfig(epochs=3, batch_size=16, seed=3)), out / "train", **q)
    train(TrainRunConfig(arch="cifar_resnet", image_size=8, train_per_class=3,
                         train=TrainConfig(epochs=2, batch_size=16, loss="cskd", seed=1)), out / "train_cskd", **q)
    for s in (1, 2):
        train(TrainRunConfig(arch="small_vgg", image_size=8, train_per_class=3,
                             train=TrainConfig(epochs=1, batch_size=16, seed=s)), out / f"t{s}", **q)
    evolve(EvolveConfig(arch="mlp", generations=3, image_size=8, train_per_class=4, eval_every=2,
                        train=TrainConfig(epochs=2, batch_size=16, warmup_epochs=1)), out / "evolve", **q)
    evolve(EvolveConfig(arch="small_vgg", split_mode="wels", generations=2, image_size=8, train_per_class=3,
                        train=TrainConfig(epochs=2, batch_size=16, loss="smooth")), out / "evolve_wels", **q)
    merge(MergeConfig(train_per_class=3, gate=TrainConfig(epochs=2, lr=0.01, batch_size=16),
                      finetune=TrainConfig(epochs=2, lr=0.01, warmup_epochs=1, batch_size=16)),
          [out / "t1/last.pt", out / "t2/last.pt"], out / "merge", **q)
    run_den(DENConfig(tasks="split:3", hidden=(8, 4), epochs=2, k=2, sigma=0.1), out / "den", **q)
    run_den(DENConfig(tasks="split:2", hidden=(8, 4), channels=(4,), epochs=1, expand_on="train", tau=0.0, k=2,
                      sigma=0.1, baselines=("dnn", "ewc", "dnn-l2")), out / "den_conv", **q)


def outcome(d: Path) -> tuple[dict, dict, dict]:
    weights = {str(f.relative_to(d)): torch.load(f, weights_only=True)["state_dict"]
               for f in sorted(d.rglob("*.pt")) if f.name != "state.pt"}
    metrics = {str(m.relative_to(d)): [{k: v for k, v in json.loads(line).items() if k not in IGNORED}
                                       for line in m.read_text().splitlines()] for m in sorted(d.rglob("metrics.jsonl"))}
    summaries = {str(m.relative_to(d)): m.read_text() for m in sorted(d.rglob("summary.md"))}
    return weights, metrics, summaries


def compare(a: Path, b: Path) -> list[str]:
    (wa, ma, sa), (wb, mb, sb) = outcome(a), outcome(b)
    bad = sorted(wa.keys() ^ wb.keys())
    bad += [f for f in wa.keys() & wb.keys()
            if wa[f].keys() != wb[f].keys() or not all(torch.equal(wa[f][k], wb[f][k]) for k in wa[f])]
    bad += [m for m in ma if ma[m] != mb.get(m)] + [s for s in sa if sa[s] != sb.get(s)]
    print(f"{len(wa)} checkpoints, {len(ma)} metrics files, {len(sa)} summaries compared; differing: {bad or 'none'}")
    return bad


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--compare"] and len(args) == 3:
        sys.exit(1 if compare(Path(args[1]), Path(args[2])) else 0)
    if len(args) != 1 or args[0].startswith("-"):  # never a run directory named like a flag
        sys.exit(__doc__)
    runs(Path(args[0]))
