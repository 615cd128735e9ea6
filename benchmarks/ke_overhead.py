"""What Knowledge Evolution costs on top of plain training of the same epochs.

    .venv/bin/python benchmarks/ke_overhead.py [--generations 3] [--epochs 5] [--repeats 2]

Both sides run the full digits training split, cifar_resnet at 16x16, the same TrainConfig, the same
per-epoch state.pt and metrics: `slimkit train` for generations*epochs epochs against `slimkit
evolve` for the same epochs. The difference is what KE adds: re-initialising the reset hypothesis,
evaluating the fit hypothesis, extracting it and saving a checkpoint per generation. Measured with
evaluation after every epoch and with --eval-every EPOCHS (once per generation); runs alternate
train/evolve and the best of --repeats is kept. Writes results/ke_overhead_<G>x<E>.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from slimkit.engine.loop import TrainConfig
from slimkit.engine.train import TrainRunConfig, train
from slimkit.methods.ke.evolve import EvolveConfig, evolve

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(fn) -> tuple[float, float]:
    """(whole run seconds, seconds inside training steps) of one run writing to a fresh directory."""
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        fn(Path(tmp) / "run")
        total = time.perf_counter() - t
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return total, sum(x.get("train_seconds", 0.0) for x in lines if x.get("kind") == "epoch")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    g, e = args.generations, args.epochs
    quiet = lambda s: None  # noqa: E731
    rows = []
    for every in (1, e):
        best = {"train": (float("inf"), 0.0), "evolve": (float("inf"), 0.0)}
        for _ in range(args.repeats):
            plain = _timed(lambda out: train(TrainRunConfig(image_size=16, eval_every=every,
                                                            train=TrainConfig(epochs=g * e, seed=0)),
                                             out, progress=False, echo=quiet))
            ke = _timed(lambda out: evolve(EvolveConfig(generations=g, image_size=16, eval_every=every,
                                                        train=TrainConfig(epochs=e, seed=0)),
                                           out, progress=False, echo=quiet))
            best["train"] = min(best["train"], plain)
            best["evolve"] = min(best["evolve"], ke)
        (pt, ps), (kt, ks) = best["train"], best["evolve"]
        rows.append({"eval_every": every, "train_total_s": pt, "train_steps_s": ps, "evolve_total_s": kt,
                     "evolve_steps_s": ks, "total_overhead": kt / pt - 1, "step_overhead": ks / ps - 1})
    cmd = f"benchmarks/ke_overhead.py --generations {g} --epochs {e} --repeats {args.repeats}"
    (RESULTS / f"ke_overhead_{g}x{e}.json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=2) + "\n")
    md = [f"# KE overhead vs plain training ({g} generations x {e} epochs, full digits train split, 2 CPU cores)", "",
          f"Reproduce: `.venv/bin/python {cmd}`. Best of {args.repeats} alternating runs per cell.", "",
          "| evaluation | `slimkit train` whole run | `slimkit evolve` whole run | overhead | overhead on training steps |",
          "|---|---:|---:|---:|---:|"]
    for r in rows:
        what = "after every epoch" if r["eval_every"] == 1 else f"--eval-every {r['eval_every']} (once per generation)"
        md.append(f"| {what} | {r['train_total_s']:.1f} s | {r['evolve_total_s']:.1f} s | "
                  f"{100 * r['total_overhead']:+.1f}% | {100 * r['step_overhead']:+.1f}% |")
    md += ["", "The whole-run difference is KE's own work: evaluating the fit hypothesis (as the masked network) "
           "whenever the dense one is evaluated, re-initialising the reset hypothesis, and extracting the fit "
           "hypothesis and writing a checkpoint at the end of each generation."]
    (RESULTS / f"ke_overhead_{g}x{e}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
