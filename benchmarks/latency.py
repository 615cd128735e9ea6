"""Dense vs KELS fit hypothesis: latency on ONNX Runtime and torch eager, side by side in one run.

    .venv/bin/python benchmarks/latency.py [--archs resnet18,resnet50,mobilenet_v2] [--rates 0.5,0.8]
        [--batches 1,8] [--provider cpu] [--runs 30] [--tag cpu]

For each architecture and split rate, four networks are timed interleaved at 224x224:
dense and slim in ONNX Runtime, the same two in torch eager, and the slim architecture produced by
torch-pruning's own MagnitudePruner at the same channel ratio, in ONNX Runtime. The last one shows
whether slimkit's surgery adds any overhead. Weights are random, because latency does not depend on
their values. Writes benchmarks/results/latency_<tag>.{md,json,png}.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

import slimkit
from slimkit.core.cost import count_macs, count_params
from slimkit.core.graph import ChannelGraph, prunable_layers
from slimkit.core.plan import kels_plan
from slimkit.deploy.bench import bench
from slimkit.deploy.export import to_verified_onnx
from slimkit.deploy.runners import check_trial, cpu_name, onnx_runner, torch_runner

RESULTS = Path(__file__).resolve().parent / "results"


def tp_magnitude(model, split_rate, shape):
    """The same width reduction done by torch-pruning's MagnitudePruner (L1 importance, per layer)."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    classifier = list(prunable_layers(m).values())[-1]
    pruner = tp.pruner.MagnitudePruner(m, torch.zeros(1, *shape), importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=1 - split_rate, ignored_layers=[classifier])
    pruner.step()
    return m


def widths(model):
    return [getattr(l, "out_channels", getattr(l, "out_features", None)) for l in prunable_layers(model).values()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="resnet18,resnet50,mobilenet_v2")
    ap.add_argument("--rates", default="0.5,0.8")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--round-to", type=int, default=8,
                    help="also time KELS widths rounded up to this multiple (0: skip)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    shape = (3, 224, 224)
    rows, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            torch.manual_seed(0)
            dense = slimkit.create_model(arch, num_classes=1000)
            dense_onnx = Path(tmp) / f"{arch}_dense.onnx"
            dense_onnx.write_bytes(to_verified_onnx(dense, shape).data)
            variants = [(float(r), 1) for r in args.rates.split(",")]
            if args.round_to > 1:
                variants += [(float(r), args.round_to) for r in args.rates.split(",")]
            for sr, round_to in variants:
                graph = ChannelGraph(copy.deepcopy(dense), shape)
                if round_to > 1 and kels_plan(graph, sr, round_to).keep == kels_plan(graph, sr).keep:
                    continue  # already aligned: same network as the unrounded row
                slim = slimkit.apply_plan(dense, kels_plan(graph, sr, round_to))
                tpm = tp_magnitude(dense, sr, shape)
                same_arch = widths(tpm) == widths(slim)
                paths = {"slim": Path(tmp) / f"{arch}_{sr}_slim.onnx", "tp": Path(tmp) / f"{arch}_{sr}_tp.onnx"}
                paths["slim"].write_bytes(to_verified_onnx(slim, shape).data)
                paths["tp"].write_bytes(to_verified_onnx(tpm, shape).data)
                runners = [onnx_runner(dense_onnx, args.provider, args.threads, shape),
                           onnx_runner(paths["slim"], args.provider, args.threads, shape),
                           onnx_runner(paths["tp"], args.provider, args.threads, shape),
                           torch_runner(dense, "dense-torch", "cpu", args.threads, shape),
                           torch_runner(slim, "slim-torch", "cpu", args.threads, shape)]
                for r, n in zip(runners, ("dense-ort", "slim-ort", "tp-magnitude-ort", "dense-torch", "slim-torch")):
                    r.name = n
                    check_trial(r)
                res = bench(runners, batches, warmup=args.warmup, runs=args.runs, threads=args.threads)
                mac_ratio = count_macs(slim, shape) / count_macs(dense, shape)
                for b in batches:
                    p = {r.model: r.p50_ms for r in res if r.batch == b}
                    lat_ratio = p["slim-ort"] / p["dense-ort"]
                    row = {"arch": arch, "split_rate": sr, "round_to": round_to, "batch": b, "provider": res[0].provider,
                           "params_ratio": count_params(slim) / count_params(dense), "mac_ratio": mac_ratio,
                           "dense_ort_ms": p["dense-ort"], "slim_ort_ms": p["slim-ort"], "tp_ort_ms": p["tp-magnitude-ort"],
                           "dense_torch_ms": p["dense-torch"], "slim_torch_ms": p["slim-torch"],
                           "latency_ratio_ort": lat_ratio, "latency_over_mac": lat_ratio / mac_ratio,
                           "within_1.15x_of_mac": lat_ratio <= 1.15 * mac_ratio,
                           "ort_speedup_over_torch_dense": p["dense-torch"] / p["dense-ort"],
                           "ort_speedup_over_torch_slim": p["slim-torch"] / p["slim-ort"],
                           "tp_over_slimkit": p["tp-magnitude-ort"] / p["slim-ort"], "tp_same_widths": same_arch}
                    rows.append(row)
                    print(f"{arch:13s} sr={sr} r={round_to} b={b}: dense {p['dense-ort']:7.2f} ms  slim {p['slim-ort']:7.2f} ms  "
                          f"ratio {lat_ratio:.3f} vs MAC {mac_ratio:.3f}  tp/slimkit {row['tp_over_slimkit']:.3f}  "
                          f"torch/ort dense {row['ort_speedup_over_torch_dense']:.2f}", flush=True)
                raw += [r.__dict__ | {"arch": arch, "split_rate": sr, "round_to": round_to} for r in res]
    env = {"device": cpu_name() if args.provider == "cpu" else raw[0]["device"], "threads": raw[0]["threads"],
           "torch": str(torch.__version__), "onnxruntime": __import__("onnxruntime").__version__,
           "python": platform.python_version(), "runs": args.runs, "warmup": args.warmup, "input": "3x224x224",
           "command": " ".join(["benchmarks/latency.py", *sys.argv[1:]])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"latency_{args.tag}.json").write_text(json.dumps({"env": env, "rows": rows, "raw": raw}, indent=2) + "\n")
    md = [f"# Dense vs KELS fit hypothesis latency ({args.tag})", "",
          f"{env['device']}, {env['threads']} threads, onnxruntime {env['onnxruntime']}, torch {env['torch']}, "
          f"fp32, 3x224x224, p50 over {args.runs} interleaved runs. Reproduce: `.venv/bin/python {env['command']}`.", "",
          "| arch | sr | round to | batch | MAC ratio | ORT dense ms | ORT slim ms | latency ratio | ratio / MAC ratio | within 1.15x | "
          "tp-magnitude / slimkit | torch dense ms | torch slim ms | ORT speed-up over torch (dense / slim) |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['arch']} | {r['split_rate']} | {r['round_to']} | {r['batch']} | {r['mac_ratio']:.3f} | {r['dense_ort_ms']:.2f} | "
                  f"{r['slim_ort_ms']:.2f} | {r['latency_ratio_ort']:.3f} | {r['latency_over_mac']:.2f} | "
                  f"{'yes' if r['within_1.15x_of_mac'] else 'no'} | {r['tp_over_slimkit']:.3f}"
                  f"{'' if r['tp_same_widths'] else ' (widths differ)'} | {r['dense_torch_ms']:.2f} | {r['slim_torch_ms']:.2f} | "
                  f"{r['ort_speedup_over_torch_dense']:.2f}x / {r['ort_speedup_over_torch_slim']:.2f}x |")
    (RESULTS / f"latency_{args.tag}.md").write_text("\n".join(md) + "\n")
    _plot(rows, RESULTS / f"latency_{args.tag}.png", args.tag)


def _plot(rows, path, tag):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = [f"{r['arch']} sr={r['split_rate']}" + (f"/{r['round_to']}" if r['round_to'] > 1 else "") + f" b={r['batch']}"
              for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["mac_ratio"] for r in rows], width=0.4, label="MAC ratio (slim/dense)")
    ax.bar([x + 0.2 for x in xs], [r["latency_ratio_ort"] for r in rows], width=0.4, label="ORT latency ratio")
    ax.set_xticks(list(xs), labels, fontsize=6, rotation=45, ha="right")
    ax.set_ylabel("slim / dense")
    ax.set_title(f"fit hypothesis cost vs dense ({tag})")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
