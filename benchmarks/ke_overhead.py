"""What Knowledge Evolution costs on top of a plain training loop of the same epochs.

    .venv/bin/python benchmarks/ke_overhead.py [--generations 3] [--epochs 5]

Both runs use the full digits training split, cifar_resnet at 16x16, the same TrainConfig:
- plain: generations*epochs epochs of the shared loop (`train_one_epoch`), evaluating the
  dense network after each epoch and saving a resumable state per epoch, as evolve does;
- evolve: the same epochs through `slimkit evolve`.
The difference is what KE adds: re-initialising the reset hypothesis, evaluating the fit
hypothesis, extracting it and saving a checkpoint per generation. Writes results/ke_overhead.md.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from slimkit.data import digits
from slimkit.evaluate import accuracy
from slimkit.models import create_model
from slimkit.training.evolve import EvolveConfig, evolve
from slimkit.training.runs import shift_augment
from slimkit.training.loop import TrainConfig, make_optimizer, train_one_epoch

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    tc = TrainConfig(epochs=args.epochs, seed=0)
    train, test = digits("train", image_size=16), digits("test", image_size=16)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        torch.manual_seed(0)
        model = create_model("cifar_resnet", num_classes=10, in_chans=1, image_size=16)
        train_s = 0.0
        for gen in range(1, args.generations + 1):
            opt = make_optimizer(model, tc)
            for epoch in range(tc.epochs):
                te = time.perf_counter()
                train_one_epoch(model, train, opt, tc, gen, epoch, augment=shift_augment)
                train_s += time.perf_counter() - te
                accuracy(model, test)
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, Path(tmp) / "state.pt")
        plain = time.perf_counter() - t

        t = time.perf_counter()
        cfg = EvolveConfig(generations=args.generations, image_size=16, train=tc)
        evolve(cfg, Path(tmp) / "ke", progress=False, echo=lambda s: None)
        ke = time.perf_counter() - t
        lines = [json.loads(x) for x in (Path(tmp) / "ke" / "metrics.jsonl").read_text().splitlines()]
        ke_train = sum(x["train_seconds"] for x in lines if x["kind"] == "epoch")

    rows = {"plain_total_s": plain, "plain_train_s": train_s, "evolve_total_s": ke, "evolve_train_s": ke_train,
            "total_overhead": ke / plain - 1, "train_step_overhead": ke_train / train_s - 1}
    (RESULTS / "ke_overhead.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = [f"# KE overhead vs a plain loop ({args.generations} generations x {args.epochs} epochs, full digits train split, 2 CPU cores)", "",
          f"Reproduce: `.venv/bin/python benchmarks/ke_overhead.py --generations {args.generations} --epochs {args.epochs}`.", "",
          "| | plain loop | slimkit evolve | overhead |", "|---|---:|---:|---:|",
          f"| training steps only | {train_s:.1f} s | {ke_train:.1f} s | {100 * rows['train_step_overhead']:+.1f}% |",
          f"| whole run | {plain:.1f} s | {ke:.1f} s | {100 * rows['total_overhead']:+.1f}% |", "",
          "The whole-run difference is KE's own work: evaluating the fit hypothesis every epoch, re-initialising the "
          "reset hypothesis, extracting the fit hypothesis and writing a checkpoint per generation."]
    (RESULTS / "ke_overhead.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
