"""How long `slimkit extract` takes on CPU, per architecture, split rate 0.5, 224x224 inputs.

    .venv/bin/python benchmarks/extract_time.py [--archs resnet18,resnet50] [--repeats 3]

Two figures per network: the whole command in a fresh process (Python + torch + torchvision
imports included), and the library call `slimkit.extract` in a warm process (median of repeats).
Writes benchmarks/results/extract_time.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import slimkit

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="resnet18,resnet50,mobilenet_v2,densenet121,vgg16_bn")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    exe = Path(sys.executable).with_name("slimkit")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            src = slimkit.save(slimkit.create_model(arch, num_classes=1000), Path(tmp) / f"{arch}.pt")
            t = time.perf_counter()
            subprocess.run([str(exe), "extract", str(src), "--split-rate", "0.5", "-o", str(Path(tmp) / "cli.pt"),
                            "--force", "--json"], check=True, capture_output=True)
            cli_s = time.perf_counter() - t
            lib = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                rep = slimkit.extract(src, 0.5, out=Path(tmp) / "lib.pt", force=True)
                lib.append(time.perf_counter() - t)
            rows.append({"arch": arch, "cli_seconds": cli_s, "extract_seconds_median": statistics.median(lib),
                         "extract_seconds_all": lib, "params_ratio": rep.slim["params"] / rep.dense["params"],
                         "macs_ratio": rep.slim["macs"] / rep.dense["macs"], "max_rel_diff": rep.max_rel_diff})
            print(f"{arch:14s} CLI {cli_s:5.2f} s   extract() {statistics.median(lib):5.2f} s", flush=True)
    env = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "torch": str(torch.__version__), "python": platform.python_version(),
           "slimkit": slimkit.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "extract_time.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    lines = [
        "# `slimkit extract` time on CPU (split rate 0.5, 1000 classes, 3x224x224)",
        "",
        f"Machine: {env['cores']} cores, torch {env['torch']} ({env['torch_threads']} threads). "
        "Reproduce: `.venv/bin/python benchmarks/extract_time.py`.",
        "",
        "| arch | whole CLI command (s) | extract() warm, median (s) | params slim/dense | MACs slim/dense | max rel diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['arch']} | {r['cli_seconds']:.2f} | {r['extract_seconds_median']:.2f} | {r['params_ratio']:.3f} | "
              f"{r['macs_ratio']:.3f} | {r['max_rel_diff']:.1e} |" for r in rows]
    (RESULTS / "extract_time.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
