"""Knowledge Evolution on image folders: the glyphs set (letters A-J, test fonts unseen) beside the digits.

    .venv/bin/python benchmarks/ke_folders.py [--seeds 0,1,2] [--per-class 20] [--generations 5]
        [--epochs 20] [--image-size 16] [--name ke_folders]

Both sets go through the image-folder path (`--data DIR`, ImageFolder trees of PNGs written from
benchmarks/data/glyphs.npz and from the bundled digits), cifar_resnet, KELS split rate 0.5,
`--augment auto` (shift), a seeded per-class training subset, evaluated at generation ends. The
table is the KE paper's: the dense network of generation 1 (N1) against the fit hypothesis and the
dense network of the last generation, mean ± sd over seeds. Writes results/<name>.{md,json}.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ms(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{100 * xs[0]:.2f}"


def main() -> None:
    from slimkit.engine.loop import TrainConfig
    from slimkit.methods.ke.evolve import EvolveConfig, evolve

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--name", default="ke_folders")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"glyphs (A-J, unseen fonts)": _tool("make_glyphs").write_folder(ROOT / "benchmarks" / "data" / "glyphs.npz",
                                                                              Path(tmp) / "glyphs"),
                "digits (as PNGs)": _tool("digits_to_folder").write(Path(tmp) / "digits", "imagefolder")["imagefolder"]}
        for seed in args.seeds:
            for k, (name, root) in enumerate(sets.items()):
                recs = evolve(EvolveConfig(data=str(root), image_size=args.image_size, generations=args.generations,
                                           train_per_class=args.per_class, subset_seed=seed, eval_every=args.epochs,
                                           train=TrainConfig(epochs=args.epochs, seed=seed)),
                              Path(tmp) / f"run_{k}_{seed}", progress=False, echo=lambda s: None, workers=0)
                rows.append({"set": name, "seed": seed, "dense": [r["dense_acc"] for r in recs],
                             "fit": [r["fit_acc"] for r in recs]})
                print(json.dumps(rows[-1]), flush=True)
    cmd = (f"PYTHONPATH=. .venv/bin/python benchmarks/ke_folders.py --seeds {','.join(map(str, args.seeds))} "
           f"--per-class {args.per_class} --generations {args.generations} --epochs {args.epochs} "
           f"--image-size {args.image_size} --name {args.name}")
    g = args.generations
    lines = ["# Knowledge Evolution through the image-folder path: glyphs and digits", "", f"Reproduce: `{cmd}`", "",
             f"cifar_resnet at {args.image_size}x{args.image_size}, KELS split rate 0.5, {args.per_class} training "
             f"images per class, {g} generations x {args.epochs} epochs, `--augment auto` (shift), seeds "
             f"{', '.join(map(str, args.seeds))}; test accuracy (%), mean ± sd over seeds. Glyphs: letters A-J "
             "from 201 fonts of Debian font packages, the test split's 11 font families never seen in training "
             "(tools/make_glyphs.py).", "",
             f"| data | N1 dense | N{g} dense | N{g} fit hypothesis (25% of the parameters) | fit N{g} - dense N1 |",
             "|---|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["set"] for r in rows):
        rs = [r for r in rows if r["set"] == name]
        gain = [r["fit"][-1] - r["dense"][0] for r in rs]
        lines.append(f"| {name} | {_ms([r['dense'][0] for r in rs])} | {_ms([r['dense'][-1] for r in rs])} | "
                     f"{_ms([r['fit'][-1] for r in rs])} | {'+' if statistics.mean(gain) >= 0 else ''}{_ms(gain)} |")
    lines += ["", "Per generation (dense / fit, mean over seeds):", "",
              "| data | " + " | ".join(f"N{i + 1}" for i in range(g)) + " |", "|---|" + "---:|" * g]
    for name in dict.fromkeys(r["set"] for r in rows):
        rs = [r for r in rows if r["set"] == name]
        lines.append(f"| {name} | " + " | ".join(
            f"{100 * statistics.mean(r['dense'][i] for r in rs):.1f} / {100 * statistics.mean(r['fit'][i] for r in rs):.1f}"
            for i in range(g)) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
