"""Where the time goes: ONNX Runtime's per-node profile of a dense network and its KELS fit hypothesis.

    .venv/bin/python benchmarks/latency_profile.py [--archs resnet18,resnet50,mobilenet_v2] [--rate 0.5]
        [--batches 1,8] [--runs 30] [--threads N]

latency.py shows how far the slim/dense latency ratio is from the MAC ratio; this script shows
why. Both networks run in ORT-CPU with profiling on, and every node's kernel time is summed by
kind: dense convs (group 1), depthwise convs, the classifier (Gemm) and everything else (adds,
pools, reshapes). Dense convs are split by how ORT runs them: in its blocked NCHWc layout (channel
counts that are multiples of the SIMD block, 8 or 16) or in plain NCHW, with layout reorders
between the two. For each kind it reports dense ms, slim ms and their ratio, and, where it is one
kind of layer, that kind's MAC ratio and activation ratio (elements read and written). A
compute-bound layer's time follows its MACs (about sr^2); a memory-bound one's follows its
activations (about sr). Writes benchmarks/results/latency_profile_sr<rate>.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

import slimkit
from slimkit.bench import cpu_name
from slimkit.export import to_verified_onnx
from slimkit.graph import ChannelGraph
from slimkit.plan import kels_plan

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("conv, blocked NCHWc", "conv, plain NCHW", "depthwise conv", "layout reorder", "classifier", "other")


def cost_by_kind(model: nn.Module, shape) -> dict[str, dict[str, int]]:
    """Per layer kind (conv, depthwise conv, classifier): MACs and activation elements read + written."""
    cost: dict[str, dict[str, int]] = defaultdict(lambda: {"macs": 0, "acts": 0})

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            c = cost["conv" if m.groups == 1 else "depthwise conv"]
            c["macs"] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            c = cost["classifier"]
            c["macs"] += out.numel() * m.in_features
        c["acts"] += inp[0].numel() + out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    return dict(cost)


def profile(onnx_path: Path, batch: int, runs: int, threads: int, workdir: Path, warmup: int = 5) -> dict[str, float]:
    """Mean kernel ms per run, summed by node kind, from ORT's profiler (nodes after graph optimisation)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    optimized = workdir / (onnx_path.stem + ".opt.onnx")
    opts.optimized_model_filepath = str(optimized)  # to tell depthwise from dense convs after fusion
    opts.enable_profiling = True
    opts.profile_file_prefix = str(workdir / onnx_path.stem)
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    nodes = {}  # node name -> (domain, group) in the optimised graph
    for node in onnx.load(str(optimized)).graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        nodes[node.name] = (node.domain, int(attrs.get("group", 1)))
    x = np.random.default_rng(0).standard_normal((batch, *sess.get_inputs()[0].shape[1:])).astype(np.float32)
    for _ in range(warmup + runs):
        sess.run(None, {"input": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])
    start = model_runs[warmup]["ts"]  # the first timed run
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start:
            continue
        name, op = e["name"][: -len("_kernel_time")], e["args"].get("op_name", "")
        domain, group = nodes.get(name, ("", 1))
        if op in ("Conv", "FusedConv") and group > 1:
            kind = "depthwise conv"
        elif op in ("Conv", "FusedConv"):
            kind = "conv, blocked NCHWc" if domain == "com.microsoft.nchwc" else "conv, plain NCHW"
        elif op in ("ReorderInput", "ReorderOutput"):
            kind = "layout reorder"
        elif op in ("Gemm", "MatMul", "FusedGemm"):
            kind = "classifier"
        else:
            kind = "other"
        totals[kind] += e["dur"] / 1e3  # us -> ms
    return {k: totals[k] / runs for k in KINDS if k in totals}


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
            cost = {"dense": cost_by_kind(dense, shape), "slim": cost_by_kind(slim, shape)}
            for b in (int(x) for x in args.batches.split(",")):
                prof = {t: profile(paths[t], b, args.runs, args.threads, work) for t in ("dense", "slim")}
                total = {t: sum(prof[t].values()) for t in prof}
                def row(kind, d, s_, cost_kind=None):
                    cd, cs = cost["dense"].get(cost_kind), cost["slim"].get(cost_kind)
                    rows.append({"arch": arch, "split_rate": args.rate, "batch": b, "kind": kind, "dense_ms": d,
                                 "slim_ms": s_, "share_of_dense": d / total["dense"], "time_ratio": s_ / d if d else None,
                                 "mac_ratio": cs["macs"] / cd["macs"] if cd else None,
                                 "activation_ratio": cs["acts"] / cd["acts"] if cd else None})

                first = len(rows)
                for kind in KINDS:
                    row(kind, prof["dense"].get(kind, 0.0), prof["slim"].get(kind, 0.0),
                        kind if kind in ("depthwise conv", "classifier") else None)
                convs = [k for k in KINDS if k.startswith("conv")]
                row("all dense convs", sum(prof["dense"].get(k, 0.0) for k in convs),
                    sum(prof["slim"].get(k, 0.0) for k in convs), "conv")
                cost["dense"]["all"], cost["slim"]["all"] = ({k: sum(c[k] for c in list(cost[t].values())) for k in ("macs", "acts")}
                                                             for t in ("dense", "slim"))
                row("total", total["dense"], total["slim"], "all")
                print(f"{arch} b={b}: " + ", ".join(
                    f"{r['kind']} {r['dense_ms']:.2f}->{r['slim_ms']:.2f} ms" for r in rows[first:]), flush=True)
    env = {"device": cpu_name(), "threads": args.threads, "onnxruntime": __import__("onnxruntime").__version__,
           "runs": args.runs, "command": " ".join(["benchmarks/latency_profile.py", *sys.argv[1:]])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"latency_profile_sr{args.rate:g}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    md = ["# Where the time goes: ORT-CPU kernel time by node kind, dense vs KELS fit hypothesis", "",
          f"{env['device']}, {env['threads']} threads, onnxruntime {env['onnxruntime']}, fp32, 3x224x224, split rate "
          f"{args.rate}, mean kernel time per run over {args.runs} profiled runs (profiling adds a little per node). "
          f"Reproduce: `.venv/bin/python {env['command']}`.", "",
          "| arch | batch | kind | share of dense time | dense ms | slim ms | time ratio | MAC ratio | activation ratio |",
          "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tr, mr, ar = ("–" if r[k] is None else f"{r[k]:.3f}" for k in ("time_ratio", "mac_ratio", "activation_ratio"))
        if r["dense_ms"] == 0 and r["slim_ms"] == 0:
            continue
        kind = f"**{r['kind']}**" if r["kind"] in ("total", "all dense convs") else r["kind"]
        md.append(f"| {r['arch']} | {r['batch']} | {kind} | {100 * r['share_of_dense']:.0f}% | {r['dense_ms']:.2f} | "
                  f"{r['slim_ms']:.2f} | {tr} | {mr} | {ar} |")
    (RESULTS / f"latency_profile_sr{args.rate:g}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
