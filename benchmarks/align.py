"""Aligned widths without retraining: dense vs slim (KELS) vs slim zero-padded to multiples of 8, 16 and
auto's pick, timed interleaved in one run on ONNX Runtime.

    .venv/bin/python benchmarks/align.py [--archs resnet18,resnet50,mobilenet_v2] [--split-rate 0.8]
        [--batches 1,8] [--runs 60] [--warmup 10] [--auto-runs 20] [--profile] [--tag sr0.8]

For each architecture at 3x224x224 (random weights, random BN statistics: latency does not depend on
their values) the KELS fit hypothesis is cut, ``choose_alignment`` times the candidates 1, 8, 16, 32
and picks one (the artefact `slimkit export --align auto` would ship), then dense, slim, aligned-8,
aligned-16 (and auto's pick when it is another) are exported (verified against the slim network) and
timed interleaved in blocks at every batch size. Reported per cell: p50/p90, the latency ratio vs
dense, the MAC ratio of the padded shapes (core/cost.py count_macs) and the issue's two goals:
aligned faster than both dense and unaligned slim, and latency ratio within 1.15x of the MAC ratio.
``--profile`` adds ONNX Runtime's kernel time by node kind (dense vs auto's pick) where a goal is
missed. Writes benchmarks/results/align_<tag>.{md,json,png}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import slimkit
from slimkit.core.cost import count_macs, count_params
from slimkit.core.graph import ChannelGraph
from slimkit.core.plan import kels_plan
from slimkit.deploy.align import align_network, choose_alignment
from slimkit.deploy.bench import bench
from slimkit.deploy.export import to_verified_onnx
from slimkit.deploy.quantize import cpu_flags
from slimkit.deploy.runners import check_trial, cpu_name, onnx_runner

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parent.parent / "tests"))

from conftest import randomize_bn  # noqa: E402  the tests' random BN statistics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="resnet18,resnet50,mobilenet_v2")
    ap.add_argument("--split-rate", type=float, default=0.8)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--auto-runs", type=int, default=20, help="timed runs per candidate in choose_alignment")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    ap.add_argument("--profile", action="store_true", help="ORT kernel time by node kind where a goal is missed")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    sr, shape = args.split_rate, (3, 224, 224)
    tag = args.tag or f"sr{sr:g}"
    rows, raw, picks, profiles = [], [], {}, []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            torch.manual_seed(0)
            dense = randomize_bn(slimkit.create_model(arch, num_classes=1000))
            slim = slimkit.apply_plan(dense, kels_plan(ChannelGraph(copy.deepcopy(dense), shape), sr))
            best, timings = choose_alignment(slim, shape, batches=batches, threads=args.threads, runs=args.auto_runs)
            picks[arch] = {"pick": best, "candidates": timings}
            print(f"{arch}: auto picks {best}: " + ", ".join(f"{t['align']}={t['score_ms']:.2f}ms" for t in timings),
                  flush=True)
            nets = {"dense": dense, "slim": slim}
            for n in sorted({8, 16, best} - {1}):
                nets[f"aligned{n}"] = align_network(slim, n)
            paths, macs, params = {}, {}, {}
            for name, net in nets.items():
                paths[name] = Path(tmp) / f"{arch}_{name}.onnx"
                ref = slim if name.startswith("aligned") else None
                paths[name].write_bytes(to_verified_onnx(net, shape, reference=ref).data)
                macs[name], params[name] = count_macs(net, shape), count_params(net)
            runners = []
            for name in nets:
                r = onnx_runner(paths[name], "cpu", args.threads, shape, batches)
                r.name = name
                runners.append(check_trial(r))
            res = bench(runners, batches, warmup=args.warmup, runs=args.runs, threads=args.threads)
            raw += [r.__dict__ | {"arch": arch} for r in res]
            auto_name = "slim" if best == 1 else f"aligned{best}"
            for b in batches:
                by = {r.model: r for r in res if r.batch == b}
                for name in nets:
                    lat = by[name].p50_ms / by["dense"].p50_ms
                    mac = macs[name] / macs["dense"]
                    row = {"arch": arch, "batch": b, "network": name, "auto_pick": name == auto_name,
                           "p50_ms": by[name].p50_ms, "p90_ms": by[name].p90_ms, "latency_ratio": lat,
                           "mac_ratio": mac, "params_ratio": params[name] / params["dense"],
                           "latency_over_mac": lat / mac, "threads": by[name].threads}
                    if name.startswith("aligned"):
                        row["faster_than_dense"] = by[name].p50_ms < by["dense"].p50_ms
                        row["faster_than_slim"] = by[name].p50_ms < by["slim"].p50_ms
                        row["within_1.15x_of_mac"] = lat <= 1.15 * mac
                    rows.append(row)
                    print(f"  b={b} {name:10s} p50 {by[name].p50_ms:8.2f} ms  ratio {lat:.3f}  MAC {mac:.3f}", flush=True)
            if args.profile:
                from slimkit.deploy.profile import profile_rows

                cells = [r for r in rows if r["arch"] == arch and r["auto_pick"] and r["network"] != "slim"
                         and not (r["faster_than_dense"] and r["faster_than_slim"] and r["within_1.15x_of_mac"])]
                for r in cells:
                    for p in profile_rows(dense, nets[auto_name], paths["dense"], paths[auto_name], shape, r["batch"],
                                          20, res[0].threads, tmp):
                        profiles.append({"arch": arch, "network": auto_name, **p})
    env = {"device": cpu_name(), "cpu_flags": cpu_flags()[1], "threads": raw[0]["threads"],
           "cpu_count": os.cpu_count(), "torch": str(torch.__version__),
           "onnxruntime": __import__("onnxruntime").__version__, "python": platform.python_version(),
           "runs": args.runs, "warmup": args.warmup, "auto_runs": args.auto_runs, "split_rate": sr,
           "input": "3x224x224", "load_average_after": os.getloadavg(), "seconds": time.time() - t0,
           "command": " ".join([".venv/bin/python benchmarks/align.py", *sys.argv[1:]])}
    RESULTS.mkdir(exist_ok=True)
    payload = {"env": env, "rows": rows, "auto": picks, "profile": profiles, "raw": raw}
    (RESULTS / f"align_{tag}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"align_{tag}.md").write_text(markdown(payload) + "\n")
    plot(rows, RESULTS / f"align_{tag}.png", sr)


def markdown(p: dict) -> str:
    env, rows = p["env"], p["rows"]
    md = [f"# Aligned widths without retraining: dense vs KELS slim vs zero-padded (split rate {env['split_rate']:g})", "",
          f"{env['device']} (flags: {', '.join(env['cpu_flags'])}), {env['threads']} threads (all of this "
          f"machine's {env['cpu_count']}; shared with other jobs, load average after the run "
          f"{', '.join(f'{x:.1f}' for x in env['load_average_after'])}), ONNX Runtime {env['onnxruntime']} CPU, "
          f"torch {env['torch']}, fp32, {env['input']}, random weights and BN statistics; p50/p90 over "
          f"{env['runs']} runs per cell, all networks of an arch timed interleaved in blocks of 5. "
          f"Reproduce: `{env['command']}`.", "",
          "| arch | batch | network | p50 ms | p90 ms | latency ratio vs dense | MAC ratio | latency / MAC ratio | "
          "faster than dense | faster than slim | within 1.15x of MAC ratio |",
          "|---|---:|---|---:|---:|---:|---:|---:|:---:|:---:|:---:|"]
    yn = {True: "yes", False: "**no**", None: ""}
    for r in rows:
        name = r["network"] + (" (auto)" if r["auto_pick"] else "")
        md.append(f"| {r['arch']} | {r['batch']} | {name} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                  f"{r['latency_ratio']:.3f} | {r['mac_ratio']:.3f} | {r['latency_over_mac']:.2f} | "
                  f"{yn[r.get('faster_than_dense')]} | {yn[r.get('faster_than_slim')]} | "
                  f"{yn[r.get('within_1.15x_of_mac')]} |")
    md += ["", "## auto's choice (`choose_alignment`: geometric mean over batches of the p50, "
               f"{env['auto_runs']} interleaved runs per candidate, timed before the table above)", "",
           "| arch | pick | " + " | ".join(f"align {c['align']} ms" for c in next(iter(p["auto"].values()))["candidates"])
           + " |", "|---|---:|" + "---:|" * len(next(iter(p["auto"].values()))["candidates"])]
    for arch, a in p["auto"].items():
        md.append(f"| {arch} | {a['pick']} | " + " | ".join(
            f"{c['score_ms']:.2f}" + (f" (= {c['same_as']})" if "same_as" in c else "") for c in a["candidates"]) + " |")
    md += ["", "## Goals (issue 20), for auto's pick", ""]
    for arch in dict.fromkeys(r["arch"] for r in rows):
        cells = [r for r in rows if r["arch"] == arch and r["auto_pick"]]
        if not cells or cells[0]["network"] == "slim":
            md.append(f"- {arch}: auto kept the unpadded slim network")
            continue
        for r in cells:
            ok = r["faster_than_dense"] and r["faster_than_slim"] and r["within_1.15x_of_mac"]
            slim = next(s for s in rows if s["arch"] == arch and s["batch"] == r["batch"] and s["network"] == "slim")
            md.append(f"- {arch} batch {r['batch']} ({r['network']}): {'met' if ok else '**missed**'}: "
                      f"{r['p50_ms']:.2f} ms vs dense {r['p50_ms'] / r['latency_ratio']:.2f} ms and slim "
                      f"{slim['p50_ms']:.2f} ms; latency ratio {r['latency_ratio']:.3f} = "
                      f"{r['latency_over_mac']:.2f}x the MAC ratio {r['mac_ratio']:.3f} (goal <= 1.15x)")
    if p["profile"]:
        from slimkit.deploy.profile import format_profile

        md += ["", "## Where the time goes where a goal is missed (ORT-CPU profile, dense vs auto's pick; "
                   "'slim ms' is the aligned network)", ""]
        md += format_profile(p["profile"], {"arch": "arch", "network": "network"})
    return "\n".join(md)


def plot(rows: list[dict], path: Path, sr: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys((r["arch"], r["batch"]) for r in rows))
    names = [n for n in dict.fromkeys(r["network"] for r in rows) if n != "dense"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs, lat, mac = [], [], []
        for j, c in enumerate(cells):
            r = next((r for r in rows if (r["arch"], r["batch"]) == c and r["network"] == n), None)
            if r is not None:
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                lat.append(r["latency_ratio"])
                mac.append(r["mac_ratio"])
        ax.bar(xs, lat, width=width, label=f"{n}: latency / dense")
        ax.scatter(xs, mac, marker="_", s=200, color="k", zorder=3)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(cells)), [f"{a} b={b}" for a, b in cells], fontsize=8, rotation=20)
    ax.set_ylabel("p50 latency / dense (bars); MAC ratio (ticks)")
    ax.set_title(f"KELS sr {sr:g}: unaligned vs zero-padded to aligned widths (ORT-CPU)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
