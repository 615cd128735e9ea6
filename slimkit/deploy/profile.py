"""Where the time goes: ONNX Runtime's per-node profile of a dense network beside its slim one.

A latency ratio that misses the MAC ratio has a cause, and this module measures it. Both networks
run in ORT-CPU with profiling on, and every node's kernel time is summed by kind:
- dense convs (group 1), split by how ORT runs them: in its blocked NCHWc layout (channel counts
  that fit the SIMD block, 8 or 16) or in plain NCHW;
- depthwise/grouped convs;
- layout reorders between NCHW and NCHWc;
- the classifier (Gemm/MatMul);
- everything else (adds, pools, reshapes).
Each kind is set beside its MAC ratio and activation ratio (elements read and written). A
compute-bound layer's time follows its MACs (about sr^2 for a KELS cut); a memory-bound one's
follows its activations (about sr). onnxruntime and onnx are imported where used.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["KINDS", "layer_costs", "node_times", "profile_rows", "format_profile"]

KINDS = ("conv, blocked NCHWc", "conv, plain NCHW", "depthwise conv", "layout reorder", "classifier", "other")


def layer_costs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, dict[str, int]]:
    """Per layer kind ("conv", "depthwise conv", "classifier"): MACs and activation elements read + written,
    for one image, from one traced forward."""
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
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return dict(cost)


def node_times(onnx_path: str | Path, batch: int, runs: int, threads: int, workdir: str | Path,
               warmup: int = 5) -> dict[str, float]:
    """Mean kernel ms per run of an ONNX file in ORT-CPU, summed by node kind (nodes after graph optimisation)."""
    import onnx
    import onnxruntime as ort

    onnx_path, workdir = Path(onnx_path), Path(workdir)
    ort.set_default_logger_severity(3)  # ORT warns that a saved NCHWc graph is hardware-specific: we only read it
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    optimized = workdir / (onnx_path.stem + ".opt.onnx")
    opts.optimized_model_filepath = str(optimized)  # to tell blocked from plain and depthwise convs after fusion
    opts.enable_profiling = True
    opts.profile_file_prefix = str(workdir / onnx_path.stem)
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    nodes = {}  # node name -> (domain, group) in the optimised graph
    for node in onnx.load(str(optimized)).graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        nodes[node.name] = (node.domain, int(attrs.get("group", 1)))
    inp = sess.get_inputs()[0]
    dtype = np.float16 if "float16" in inp.type else np.float32
    x = np.random.default_rng(0).standard_normal((batch, *inp.shape[1:])).astype(dtype)
    for _ in range(warmup + runs):
        sess.run(None, {inp.name: x})
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


def profile_rows(dense: nn.Module, slim: nn.Module, dense_onnx: str | Path, slim_onnx: str | Path,
                 input_shape: tuple[int, ...], batch: int, runs: int, threads: int,
                 workdir: str | Path) -> list[dict[str, Any]]:
    """One row per node kind (plus "all dense convs" and "total"): dense ms, slim ms, time/MAC/activation ratio."""
    cost = {"dense": layer_costs(dense, input_shape), "slim": layer_costs(slim, input_shape)}
    for t in cost:
        cost[t]["all"] = {k: sum(c[k] for c in list(cost[t].values())) for k in ("macs", "acts")}
    prof = {"dense": node_times(dense_onnx, batch, runs, threads, workdir),
            "slim": node_times(slim_onnx, batch, runs, threads, workdir)}
    total = {t: sum(prof[t].values()) for t in prof}
    rows = []

    def row(kind: str, d: float, s: float, cost_kind: str | None = None) -> None:
        cd, cs = cost["dense"].get(cost_kind), cost["slim"].get(cost_kind)
        rows.append({"batch": batch, "kind": kind, "dense_ms": d, "slim_ms": s,
                     "share_of_dense": d / total["dense"] if total["dense"] else 0.0,
                     "time_ratio": s / d if d else None,
                     "mac_ratio": cs["macs"] / cd["macs"] if cd and cs and cd["macs"] else None,
                     "activation_ratio": cs["acts"] / cd["acts"] if cd and cs and cd["acts"] else None})

    for kind in KINDS:
        row(kind, prof["dense"].get(kind, 0.0), prof["slim"].get(kind, 0.0),
            kind if kind in ("depthwise conv", "classifier") else None)
    convs = [k for k in KINDS if k.startswith("conv")]
    row("all dense convs", sum(prof["dense"].get(k, 0.0) for k in convs), sum(prof["slim"].get(k, 0.0) for k in convs),
        "conv")
    row("total", total["dense"], total["slim"], "all")
    return rows


def format_profile(rows: list[dict[str, Any]], lead: dict[str, str] | None = None) -> list[str]:
    """Markdown table lines; ``lead`` adds leading columns (name -> key of each row)."""
    lead = lead or {}
    head = "| " + "".join(f"{n} | " for n in lead) + ("batch | kind | share of dense time | dense ms | slim ms | "
                                                      "time ratio | MAC ratio | activation ratio |")
    lines = [head, "|" + "---|" * len(lead) + "---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["dense_ms"] == 0 and r["slim_ms"] == 0:
            continue
        tr, mr, ar = ("–" if r[k] is None else f"{r[k]:.3f}" for k in ("time_ratio", "mac_ratio", "activation_ratio"))
        kind = f"**{r['kind']}**" if r["kind"] in ("total", "all dense convs") else r["kind"]
        lines.append("| " + "".join(f"{r[k]} | " for k in lead.values())
                     + f"{r['batch']} | {kind} | {100 * r['share_of_dense']:.0f}% | {r['dense_ms']:.2f} | "
                       f"{r['slim_ms']:.2f} | {tr} | {mr} | {ar} |")
    return lines
