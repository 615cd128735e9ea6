"""The zoo table: every torchvision classifier and 40+ timm CNN families through `extract`'s path.

    .venv/bin/python benchmarks/zoo.py                       # the whole table, 3x64x64 inputs
    .venv/bin/python benchmarks/zoo.py --size 224 --max-params 25.6e6 --tag 224   # up to ResNet-50 size

For each model: built on the meta device first (a refusal needs no weights: its reason and time to
refusal are recorded), otherwise with random weights and random BN statistics, then the KELS fit
hypothesis at split rate 0.5 is cut and verified against the masked dense network
(`slimkit.models.hypothesis.fit_hypothesis`, what `slimkit extract` runs after reading the file) in a warm
process (a resnet18 extraction runs first), recording its time, the parameter and MAC ratios and
the verified error. Inputs: 3 x SIZE x SIZE (inception_v3 at least 80, alexnet/VGG 224).
Writes benchmarks/results/zoo[_TAG].{md,json}; the whole table also slimkit/_data/zoo.json (what
`slimkit models` shows).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results"

from conftest import randomize_bn  # noqa: E402
from test_zoo import ARGS, TIMM_CUT, TIMM_REFUSED  # noqa: E402  the same model list as the zoo test

MIN_224 = {"alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "timm/vgg11"}

import slimkit  # noqa: E402
from slimkit.core.errors import SlimkitError  # noqa: E402
from slimkit.core.graph import ChannelGraph  # noqa: E402
from slimkit.models.checkpoint import Loaded  # noqa: E402
from slimkit.models.hypothesis import fit_hypothesis  # noqa: E402


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except Exception:
        return platform.processor() or platform.machine()


def one(name: str, size: int, max_params: float) -> dict:
    shape = (3, size, size)
    if "inception" in name and size < 80:
        shape = (3, 80, 80)
    if name in MIN_224 and size < 224:
        shape = (3, 224, 224)  # their adaptive pools need it
    args = {"num_classes": 1000, **ARGS.get(name, {})}
    row = {"model": name, "input": list(shape)}
    try:
        with torch.device("meta"):
            meta = slimkit.create_model(name, **args)
    except SlimkitError:  # a constructor that copies data (torchvision's RegNet) cannot run on meta
        meta = slimkit.create_model(name, input_shape=shape, **args)
    n_params = sum(p.numel() for p in meta.parameters())
    row["params"] = n_params
    t = time.perf_counter()
    try:
        if any(p.is_meta for p in meta.parameters()):
            # at the model's own input size: a ViT cannot even run at 64x64, so its attention would go unseen
            ChannelGraph(meta, meta.slimkit_spec.input_shape)
    except SlimkitError as exc:
        if "meta" not in str(exc):  # tracing itself runs on CPU tensors: a meta model cannot be traced
            row.update(outcome="refused", reason=str(exc), refuse_seconds=time.perf_counter() - t)
            return row
    if n_params > max_params:
        row.update(outcome="cut (not timed)", reason=f"{n_params / 1e6:.0f} M parameters > --max-params; "
                                                     "tests/test_zoo.py cuts and verifies it")
        return row
    dense = randomize_bn(slimkit.create_model(name, input_shape=shape, **args))
    src = Loaded(dense, "slimkit", Path(name), "", 0, {})
    t = time.perf_counter()
    try:
        fh = fit_hypothesis(src, 0.5)
    except SlimkitError as exc:
        row.update(outcome="refused", reason=str(exc), refuse_seconds=time.perf_counter() - t)
        return row
    row.update(outcome="cut", warm_seconds=time.perf_counter() - t, max_rel_diff=fh.max_rel_diff,
               params_ratio=slimkit.count_params(fh.slim) / slimkit.count_params(dense),
               macs_ratio=fh.slim_macs / fh.dense_macs)
    return row


def main() -> None:
    import torchvision

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="", help="comma-separated models (default: the whole zoo)")
    ap.add_argument("--tag", default="", help="results file suffix: zoo_TAG.md")
    ap.add_argument("--size", type=int, default=64, help="input height and width")
    ap.add_argument("--max-params", type=float, default=200e6,
                    help="larger models that pass the construct scan are not timed (the zoo test cuts them)")
    args = ap.parse_args()
    names = torchvision.models.list_models(module=torchvision.models)
    names += ["timm/" + n for n in TIMM_CUT + TIMM_REFUSED]
    if args.models:
        names = args.models.split(",")
    fit_hypothesis(Loaded(slimkit.create_model("resnet18", input_shape=(3, 64, 64)), "slimkit", Path("w"), "", 0, {}), 0.5)
    rows = []
    for name in names:
        row = one(name, args.size, args.max_params)
        rows.append(row)
        extra = (f"warm {row['warm_seconds']:.2f} s  params {row['params_ratio']:.3f}  MACs {row['macs_ratio']:.3f}"
                 if "warm_seconds" in row else row.get("reason", ""))
        print(f"{name:32s} {row['outcome']:8s} {extra}", flush=True)
    env = {"cpu": _cpu(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "torch": str(torch.__version__), "python": platform.python_version(), "slimkit": slimkit.__version__}
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        pass
    RESULTS.mkdir(exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    (RESULTS / f"zoo{suffix}.json").write_text(json.dumps({"env": env, "size": args.size, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"zoo{suffix}.md").write_text(_markdown(rows, env, args.size))
    if not args.models and not args.tag:
        outcomes = {r["model"]: ("yes" if r["outcome"].startswith("cut") else "refused: " + _short(r["reason"]))
                    for r in rows}
        (ROOT / "slimkit" / "_data" / "zoo.json").write_text(json.dumps(outcomes, indent=1, sort_keys=True) + "\n")


def _short(reason: str) -> str:
    return reason.split("; slimkit cannot cut")[0]


def _markdown(rows: list[dict], env: dict, size: int) -> str:
    cut = [r for r in rows if r["outcome"] == "cut"]
    refused = [r for r in rows if r["outcome"] == "refused"]
    small = [r for r in cut if r["params"] <= 25.6e6]  # up to ResNet-50's size
    lines = [
        f"# The zoo: {len(rows)} models, {len(cut) + sum(r['outcome'] == 'cut (not timed)' for r in rows)} cut exactly, "
        f"{len(refused)} refused with a reason",
        "",
        f"Split rate 0.5, 1000 classes, input 3x{size}x{size} (Inception at least 80, AlexNet/VGG 224), random "
        "weights and BN statistics. "
        f"CPU: {env['cpu']}, {env['cores']} cores, torch {env['torch']} ({env['torch_threads']} threads)"
        + (f", timm {env['timm']}" if "timm" in env else "") + ". The machine was shared with other jobs: times are "
        "upper bounds. Reproduce: `.venv/bin/python benchmarks/zoo.py` (and `--size 224 --max-params 25.6e6 --tag 224` for zoo_224.md).",
        "",
        "Time = `fit_hypothesis`: construct scan, trace, KELS plan, masks, cut, and the verifying forward of slim and "
        "masked dense at batch 2 (what `slimkit extract` does after reading the file), in a warm process. Refusal "
        "time = on a model built on the meta device.",
        "",
    ]
    if small:
        worst = max(small, key=lambda r: r["warm_seconds"])
        lines += [f"Models up to ResNet-50's size (25.6 M parameters): {len(small)}, warm extract at most "
                  f"{worst['warm_seconds']:.2f} s ({worst['model']}).", ""]
    lines += ["| model | parameters | outcome | params slim/dense | MACs slim/dense | max rel diff | extract (s) |",
              "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["outcome"] == "cut":
            lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} M | cut | {r['params_ratio']:.3f} | "
                         f"{r['macs_ratio']:.3f} | {r['max_rel_diff']:.1e} | {r['warm_seconds']:.2f} |")
        elif r["outcome"] == "refused":
            lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} M | refused in {r['refuse_seconds']:.2f} s: "
                         f"{_short(r['reason'])} | | | | |")
        else:
            lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['outcome']}: {r['reason']} | | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
