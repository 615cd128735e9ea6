"""Where the time goes: ONNX Runtime's per-node profile of a dense network and its KELS fit hypothesis.

    .venv/bin/python benchmarks/latency_profile.py [--archs resnet18,resnet50,mobilenet_v2] [--rate 0.5]
        [--batches 1,8] [--runs 30] [--threads N]

latency.py shows how far the slim/dense latency ratio is from the MAC ratio; this script shows
why, with `slimkit.deploy.profile` (the same table `slimkit compare --profile` prints): ORT-CPU kernel time
by node kind (blocked/plain convs, depthwise convs, layout reorders, classifier, the rest) for dense
and slim resnet18/resnet50/mobilenet_v2 at 224x224, beside each kind's MAC and activation ratio.
Writes benchmarks/results/latency_profile_sr<rate>.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

import slimkit
from slimkit.core.graph import ChannelGraph
from slimkit.core.plan import kels_plan
from slimkit.deploy.export import to_verified_onnx
from slimkit.deploy.profile import format_profile, profile_rows
from slimkit.deploy.runners import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="resnet18,resnet50,mobilenet_v2")
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    shape = (3, 224, 224)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for arch in args.archs.split(","):
            torch.manual_seed(0)
            dense = slimkit.create_model(arch, num_classes=1000)
            slim = slimkit.apply_plan(dense, kels_plan(ChannelGraph(copy.deepcopy(dense), shape), args.rate))
            paths = {}
            for tag, net in (("dense", dense), ("slim", slim)):
                paths[tag] = work / f"{arch}_{tag}.onnx"
                paths[tag].write_bytes(to_verified_onnx(net, shape).data)
            for b in (int(x) for x in args.batches.split(",")):
                got = profile_rows(dense, slim, paths["dense"], paths["slim"], shape, b, args.runs, args.threads, work)
                rows += [{"arch": arch, "split_rate": args.rate, **r} for r in got]
                print(f"{arch} b={b}: " + ", ".join(f"{r['kind']} {r['dense_ms']:.2f}->{r['slim_ms']:.2f} ms"
                                                    for r in got), flush=True)
    env = {"device": cpu_name(), "threads": args.threads, "onnxruntime": __import__("onnxruntime").__version__,
           "runs": args.runs, "command": " ".join(["benchmarks/latency_profile.py", *sys.argv[1:]])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"latency_profile_sr{args.rate:g}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    md = ["# Where the time goes: ORT-CPU kernel time by node kind, dense vs KELS fit hypothesis", "",
          f"{env['device']}, {env['threads']} threads, onnxruntime {env['onnxruntime']}, fp32, 3x224x224, split rate "
          f"{args.rate}, mean kernel time per run over {args.runs} profiled runs (profiling adds a little per node). "
          f"Reproduce: `.venv/bin/python {env['command']}`.", ""]
    md += format_profile(rows, lead={"arch": "arch"})
    (RESULTS / f"latency_profile_sr{args.rate:g}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
