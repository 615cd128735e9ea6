"""Equal data, equal results? The bundled digits through the built-in path, an ImageFolder tree of PNGs
and a Knowledge Evolution lists/ layout; and the loader against the training step.

    .venv/bin/python benchmarks/data_paths.py [--seeds 0,1] [--per-class 10] [--generations 5]
        [--epochs 20] [--train-epochs 30] [--workers 0] [--name data_paths]

Part 1 writes the digits with tools/digits_to_folder.py (8x8 grayscale PNGs, the built-in split)
and runs `evolve` and `train` (cifar_resnet, 16x16, default --augment auto = shift) on each path
with the same seeds and the same --train-per-class subset, the paths interleaved per seed so that
load on a shared machine falls on all of them alike. It records accuracy per generation (dense and
fit hypothesis) and seconds per epoch: training only, and with evaluation (evaluated once per
generation, --eval-every EPOCHS). Differences that remain by construction: the folder paths read
RGB (a 3-channel first conv) normalised with ImageNet's mean/std and rounded to 8 bits; the
ImageFolder path lists items class by class, so its seeded batches differ from the built-in order.

Part 2 times, on the whole training split as PNGs (1,437 images, crop-flip at 16 px, batch 64), the
images/s of: the old loader (torchvision ImageFolder decoding every PNG every epoch with PIL
transforms, as slimkit did before), the new loader (decoded once, augmented per item on uint8
tensors) with 0 and max(1, --workers) processes, and the training step of cifar_resnet (forward, backward,
SGD step) on in-memory batches. Writes results/<name>.{md,json}.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def _writer():
    spec = importlib.util.spec_from_file_location("digits_to_folder", ROOT / "tools" / "digits_to_folder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write


def _epochs(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x]


def _run_paths(paths: dict[str, str], args, tmp: Path) -> list[dict]:
    from slimkit.engine.loop import TrainConfig
    from slimkit.engine.train import TrainRunConfig, train
    from slimkit.methods.ke.evolve import EvolveConfig, evolve

    quiet = lambda s: None  # noqa: E731
    rows = []
    for seed in args.seeds:
        for k, (name, data) in enumerate(paths.items()):  # interleaved: every path sees the same machine load
            out = tmp / f"evolve_{k}_{seed}"
            t = time.perf_counter()
            recs = evolve(EvolveConfig(data=data, image_size=16, generations=args.generations,
                                       train_per_class=args.per_class, subset_seed=seed, eval_every=args.epochs,
                                       train=TrainConfig(epochs=args.epochs, seed=seed)),
                          out, progress=False, echo=quiet, workers=args.workers)
            wall = time.perf_counter() - t
            ep = _epochs(out)
            rows.append({"verb": "evolve", "path": name, "seed": seed, "wall_s": wall,
                         "dense": [r["dense_acc"] for r in recs], "fit": [r["fit_acc"] for r in recs],
                         "train_s_per_epoch": statistics.mean(r["train_seconds"] for r in ep),
                         "s_per_epoch": statistics.mean(r["seconds"] for r in ep)})
            print(json.dumps(rows[-1]), flush=True)
        for k, (name, data) in enumerate(paths.items()):
            out = tmp / f"train_{k}_{seed}"
            rec = train(TrainRunConfig(data=data, image_size=16, train_per_class=args.per_class, subset_seed=seed,
                                       eval_every=args.train_epochs, train=TrainConfig(epochs=args.train_epochs, seed=seed)),
                        out, progress=False, echo=quiet, workers=args.workers)
            ep = _epochs(out)
            rows.append({"verb": "train", "path": name, "seed": seed, "test_acc": rec["test_acc"],
                         "train_s_per_epoch": statistics.mean(r["train_seconds"] for r in ep),
                         "s_per_epoch": statistics.mean(r["seconds"] for r in ep)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _images_per_s(batches, repeats: int = 3) -> float:
    """Best of ``repeats`` passes over ``batches()`` (an iterable factory), in images per second."""
    best = float("inf")
    n = 0
    for _ in range(repeats):
        t = time.perf_counter()
        n = sum(len(y) for _, y in batches())
        best = min(best, time.perf_counter() - t)
    return n / best


def _loader_rates(folder: Path, workers: int) -> dict[str, float]:
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    from slimkit.data.images import IMAGENET_MEAN, IMAGENET_STD, image_dir
    from slimkit.data.loading import epoch_loader
    from slimkit.models import create_model

    old_tf = T.Compose([T.RandomResizedCrop((16, 16)), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # slimkit's folder transform before issue 13
    old = ImageFolder(str(folder / "train"), transform=lambda im: old_tf(im.convert("RGB")))
    rates = {"old loader (PIL per epoch, main process)":
             _images_per_s(lambda: DataLoader(old, batch_size=64, shuffle=True))}
    t = time.perf_counter()
    new0 = image_dir(str(folder), (3, 16, 16), "train", augment="crop-flip", workers=0).prepare()
    rates["decoding the cache once (s, not images/s)"] = time.perf_counter() - t
    rates["new loader, 0 workers"] = _images_per_s(lambda: epoch_loader(new0, 64, 1))
    workers = max(1, workers)
    if workers > 0:
        neww = image_dir(str(folder), (3, 16, 16), "train", augment="crop-flip", workers=workers).prepare()
        list(epoch_loader(neww, 64, 0))  # start the persistent workers
        rates[f"new loader, {workers} persistent worker(s)"] = _images_per_s(lambda: epoch_loader(neww, 64, 1))
    model = create_model("cifar_resnet", num_classes=10, in_chans=3, image_size=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [(x.clone(), y.clone()) for x, y in epoch_loader(new0, 64, 2)]

    def steps():
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            yield x, y

    rates["training step (cifar_resnet 16 px, fwd+bwd+SGD)"] = _images_per_s(steps, repeats=2)
    return rates


def _mean_sd(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.2f}" + (f" ± {100 * statistics.stdev(xs):.2f}" if len(xs) > 1 else "")


def _markdown(rows: list[dict], rates: dict[str, float], args, cmd: str) -> str:
    paths = list(dict.fromkeys(r["path"] for r in rows))
    ev = {p: [r for r in rows if r["verb"] == "evolve" and r["path"] == p] for p in paths}
    tr = {p: [r for r in rows if r["verb"] == "train" and r["path"] == p] for p in paths}
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    lines = ["# Built-in digits vs ImageFolder vs KE lists: the same images through three paths", "",
             f"Reproduce: `{cmd}`", "",
             f"cifar_resnet at 16x16, {args.per_class} training images per class (the same seeded subset on every "
             f"path), the full 359-image test split, `--augment auto` (shift), seeds {', '.join(map(str, args.seeds))}; "
             f"evolve: {args.generations} generations x {args.epochs} epochs, KELS 0.5, evaluated at generation ends; "
             f"train: {args.train_epochs} epochs. Loader workers: {args.workers}. CPU: {cpu}, "
             f"{torch.get_num_threads()} torch threads, a machine shared with other jobs (timings are noisy; "
             "the paths are interleaved per seed). Mean ± sd over seeds.", "",
             "## evolve: test accuracy (%) per generation", "",
             "| path | " + " | ".join(f"N{g + 1} dense / fit" for g in range(args.generations)) + " |",
             "|---|" + "---:|" * args.generations]
    for p in paths:
        cells = [f"{_mean_sd([r['dense'][g] for r in ev[p]])} / {_mean_sd([r['fit'][g] for r in ev[p]])}"
                 for g in range(args.generations)]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    base = paths[0]
    lines += ["", "## seconds per epoch (best of the seeds' runs; each run's mean over its epochs)", "",
              "| path | evolve: training | evolve: with evaluation | ratio to built-in | train: training | "
              "train: with evaluation | `train` test accuracy (%) |", "|---|---:|---:|---:|---:|---:|---:|"]
    b = min(r["s_per_epoch"] for r in ev[base])
    for p in paths:  # the best seed of each path: load from other jobs only ever adds time
        s = min(r["s_per_epoch"] for r in ev[p])
        lines.append(f"| {p} | {min(r['train_s_per_epoch'] for r in ev[p]):.3f} | {s:.3f} | {s / b:.2f}x | "
                     f"{min(r['train_s_per_epoch'] for r in tr[p]):.3f} | "
                     f"{min(r['s_per_epoch'] for r in tr[p]):.3f} | {_mean_sd([r['test_acc'] for r in tr[p]])} |")
    lines += ["", "## loader vs training step (whole training split as PNGs, crop-flip, batch 64)", "",
              "| what | images/s |", "|---|---:|"]
    for k, v in rates.items():
        lines.append(f"| {k} | {v:.2f} s |" if k.startswith("decoding") else f"| {k} | {v:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--train-epochs", type=int, default=30)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--name", default="data_paths")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        roots = _writer()(Path(tmp) / "digits")
        paths = {"built-in digits": "digits", "ImageFolder PNGs": str(roots["imagefolder"]),
                 "KE lists/ PNGs": str(roots["lists"])}
        rows = _run_paths(paths, args, Path(tmp))
        rates = _loader_rates(roots["imagefolder"], args.workers)
    cmd = (f"PYTHONPATH=. .venv/bin/python benchmarks/data_paths.py --seeds {','.join(map(str, args.seeds))} "
           f"--per-class {args.per_class} --generations {args.generations} --epochs {args.epochs} "
           f"--train-epochs {args.train_epochs} --workers {args.workers} --name {args.name}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": cmd, "rows": rows, "loader": rates}, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(_markdown(rows, rates, args, cmd))
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
