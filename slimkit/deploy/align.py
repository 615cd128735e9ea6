"""Aligned widths without retraining: pad a slim network's cut layers with zero channels.

ONNX Runtime's blocked (NCHWc) CPU convolutions take channel counts in blocks of 8 (AVX2) or 16
(AVX-512); ceil(0.8*C) gives widths such as 52 or 205 that fall back to plain NCHW with layout
reorders, so a slim network can run slower than its dense parent. Padding every cut layer back up to
a multiple of N with zero filters (and its readers with zero kernels) computes exactly the same
function and fits those kernels. Nothing here knows an architecture: the aligned network is the dense
source cut by an *aligned plan* (for every coupled group a superset of the slim plan's kept channels,
min(round_up(k, N), C) of them) through the one surgery, and every weight finds its place by the
index trick below. A padded channel carries weight 0 and bias 0 in its conv and BN (running mean 0,
variance 1), so it is exactly zero after every conv, BN, activation with f(0) = 0, residual add,
concatenation, depthwise and grouped conv; where it is not (a sigmoid gate: 0.5), it only ever
multiplies a zero channel, or is read by a zero kernel.
"""
from __future__ import annotations

import contextlib
import copy
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.globalstate import usable_cpus
from slimkit.core.graph import ChannelGraph, prunable_layers
from slimkit.core.plan import KeepPlan, segments
from slimkit.core.surgery import cut, plans_of
from slimkit.models import create_model, spec_of

__all__ = ["align_network", "aligned_plan", "choose_alignment", "pick_alignment", "cpu_block", "check_align",
           "layer_widths", "ALIGN_CANDIDATES", "VERIFY_RTOL", "align_for_export"]

ALIGN_CANDIDATES = (1, 8, 16, 32)  # 1: the slim network as it is; 8: AVX2 blocks; 16: AVX-512 blocks
VERIFY_RTOL = 1e-9  # aligned vs slim in float64, relative to max |logit| (a leak differs by a channel's share)


def check_align(align: Any) -> int | str:
    """A positive integer (a channel multiple) or ``"auto"``; anything else is refused in one line."""
    if isinstance(align, str) and align.strip().lower() == "auto":
        return "auto"
    if isinstance(align, bool):
        n = 0
    else:
        try:
            n = int(align)
            if isinstance(align, float) and align != n:
                n = 0
        except (TypeError, ValueError):
            n = 0
    if n < 1:
        raise SlimkitError(f"--align must be a positive integer (a channel multiple such as 8 or 16) or 'auto', "
                           f"got {align!r}")
    return n


@contextlib.contextmanager
def _float64_default() -> Iterator[None]:
    """Build and trace index networks in float64 (exact integers up to 2**53); restore the default after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _dense_source(model: nn.Module) -> nn.Module:
    """A fresh dense network of ``model``'s source (widened first for a merged big student)."""
    spec = spec_of(model)
    dense = create_model(spec.arch, input_shape=spec.input_shape, **spec.args)
    if getattr(model, "slimkit_concat", 1) == 2:
        from slimkit.core.widen import widen

        widen(dense, spec.input_shape)
    return dense


@torch.no_grad()
def _fill_indices(model: nn.Module) -> None:
    """Every floating state entry holds its own flat indices (0, 1, 2, ...) in float64."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.data = torch.arange(t.numel(), dtype=torch.float64).view(t.shape)


def _kept_outputs(dense: nn.Module, slim_idx: nn.Module) -> dict[str, list[int]]:
    """Dense output channels every conv/linear layer of the index-filled slim network still has."""
    dense_layers = prunable_layers(dense)
    kept = {}
    for name, m in prunable_layers(slim_idx).items():
        d = dense_layers[name].weight
        row = d.numel() // d.shape[0]  # entries per output channel in the dense weight
        first = m.weight.detach().reshape(m.weight.shape[0], -1)[:, 0]  # (C_out_slim,) flat dense indices
        kept[name] = [int(i) // row for i in first.tolist()]
    return kept


def _round_up(k: int, n: int, multiple: int) -> int:
    return min(n, math.ceil(k / multiple) * multiple)


def aligned_plan(graph: ChannelGraph, kept: dict[str, list[int]], multiple: int) -> KeepPlan:
    """The plan on ``graph``'s dense network that keeps, in every cut group, a superset of what the slim
    network keeps (``kept``: dense output channels per layer), min(round_up(k, multiple), C) channels.

    A group whose members cover different parts of it (a concatenation of splits) is padded segment by
    segment, so every member's width is aligned. A group read or written by grouped convs keeps the
    same positions in every block, so the padded width is the smallest one at which all blocks grow
    alike and the total is a multiple (or the block is full).
    """
    keep: dict[str, set[int]] = {}
    for g in graph.groups:
        roots: set[int] = set()
        for p in g.producers:
            if p.name in kept:
                mine = set(kept[p.name])
                roots.update(r for loc, r in zip(p.local, p.root) if loc in mine)
        if len(roots) == g.size or not roots:
            continue  # not cut: unchanged
        bounds, block = segments(graph, g)
        segs = [(a, b) for a, b in zip(bounds, bounds[1:])]
        padded = set(roots)
        if block is None:
            for a, b in segs:
                inside = sorted(r for r in roots if a <= r < b)
                free = [r for r in range(a, b) if r not in roots]
                padded.update(free[: _round_up(len(inside), b - a, multiple) - len(inside)])
        else:
            offsets = [tuple(r - a for r in range(a, b) if r in roots) for a, b in segs]
            widths = {b - a for a, b in segs}
            if len(set(offsets)) == 1 and len(widths) == 1:  # the same positions in equal blocks
                n, kept_off = widths.pop(), offsets[0]
                t = next((t for t in range(len(kept_off), n + 1) if (t * len(segs)) % multiple == 0), n)
                extra = [o for o in range(n) if o not in kept_off][: t - len(kept_off)]
                padded.update(a + o for a, _ in segs for o in extra)
        for p in g.producers:
            keep.setdefault(p.name, set()).update(loc for loc, r in zip(p.local, p.root) if r in padded)
    return KeepPlan({n: tuple(sorted(k)) for n, k in keep.items()}, origin=f"aligned to {multiple}")


@torch.no_grad()
def _place(aligned_idx: torch.Tensor, slim_idx: torch.Tensor, slim_val: torch.Tensor, pad: float,
           key: str) -> torch.Tensor:
    """The aligned entry: the slim value where its dense index is one of the slim tensor's, else ``pad``."""
    if not slim_val.is_floating_point():  # counters (BN's num_batches_tracked): not cut
        return slim_val.clone()
    if aligned_idx.shape == slim_idx.shape and torch.equal(aligned_idx, slim_idx):
        return slim_val.clone()
    s_sorted, order = slim_idx.flatten().sort()
    a = aligned_idx.flatten()
    pos = torch.searchsorted(s_sorted, a).clamp_max(s_sorted.numel() - 1)
    hit = s_sorted[pos] == a
    if int(hit.sum()) != slim_idx.numel():  # every slim entry must land exactly once
        raise SlimkitError(f"cannot align {key}: {int(hit.sum())} of its {slim_idx.numel()} slim entries "
                           "have a place in the aligned network; please report this network")
    out = torch.full((a.numel(),), pad, dtype=slim_val.dtype, device=slim_val.device)
    out[hit.to(out.device)] = slim_val.flatten()[order[pos[hit]].to(slim_val.device)]
    return out.view(aligned_idx.shape)


def _pad_value(key: str) -> float:
    # a padded channel's BN divides by sqrt(running_var + eps): 1 keeps it finite; every other entry
    # (filters, kernels, biases, BN weight/bias/mean, PReLU slopes) is 0, so the channel stays exactly 0
    return 1.0 if key.endswith("running_var") else 0.0


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv/linear layer (fully qualified name -> channels)."""
    return {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for n, m in prunable_layers(model).items()}


def align_network(model: nn.Module, multiple: int, verify: bool = True) -> nn.Module:
    """A copy of the slimkit-built (possibly cut) ``model`` whose cut layers are padded with zero
    channels up to a multiple of ``multiple`` (never beyond the dense width); same function.

    The result carries the ModelSpec, one plan (the aligned plan on the dense source) and
    ``slimkit_align``, so it saves, exports and reloads like any slim network. ``verify`` compares it
    with ``model`` in float64 on a random input and refuses a difference beyond VERIFY_RTOL.
    """
    multiple = check_align(multiple)
    if multiple == "auto":
        raise SlimkitError("align_network needs a channel multiple; use choose_alignment for 'auto'")
    spec = spec_of(model)
    shape = tuple(spec.input_shape)
    plans = plans_of(model)
    if multiple == 1 or not plans:
        out = copy.deepcopy(model)
        out.slimkit_align = multiple
        return out
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with _float64_default(), torch.inference_mode(False):
        dense_idx = _dense_source(model)
        _fill_indices(dense_idx)
        slim_idx = copy.deepcopy(dense_idx)
        for plan in plans:  # cut exactly as the slim network was (models/checkpoint.py rebuilds it so)
            cut(ChannelGraph(slim_idx, shape), plan)
        graph = ChannelGraph(dense_idx, shape)
        plan = aligned_plan(graph, _kept_outputs(dense_idx, slim_idx), multiple)
        aligned = cut(graph, plan)  # dense_idx, cut in place
    del graph

    def entries(m: nn.Module) -> dict[str, torch.Tensor]:  # parameters and every buffer (persistent or not)
        return {**dict(m.named_parameters()), **dict(m.named_buffers())}

    slim_state, slim_idx_state, own = entries(model), entries(slim_idx), entries(aligned)
    if set(own) != set(slim_state):
        extra = sorted(set(own) ^ set(slim_state))
        raise SlimkitError(f"cannot align this network: its state differs from its source's rebuilt one at {extra[0]}")
    with torch.no_grad():
        for k, t in own.items():
            t.data = _place(t.detach(), slim_idx_state[k].detach(), slim_state[k].detach(), _pad_value(k), k)
    aligned.to(device)
    for p_a, p_s in zip(aligned.parameters(), model.parameters()):
        p_a.requires_grad_(p_s.requires_grad)
    aligned.slimkit_spec = spec
    aligned.slimkit_align = multiple
    if getattr(model, "slimkit_concat", 1) != 1:
        aligned.slimkit_concat = model.slimkit_concat
    aligned.train(model.training)
    if verify:
        _verify(model, aligned, shape)
    return aligned


def _verify(slim: nn.Module, aligned: nn.Module, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, *shape, generator=gen, dtype=torch.float64)
    try:
        with torch.inference_mode():
            a = copy.deepcopy(aligned).eval().double().cpu()(x)
            s = copy.deepcopy(slim).eval().double().cpu()(x)
    except (RuntimeError, TypeError, NotImplementedError):
        return  # no float64 kernels for some op: the ONNX export verifies in float32
    rel = float((a - s).abs().max()) / max(float(s.abs().max()), 1e-12)
    if not rel <= VERIFY_RTOL:
        raise SlimkitError(f"aligned network differs from the slim one by {rel:.1e} (relative, float64); "
                           "please report this network")


def choose_alignment(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    provider: str = "cpu",
    batches: Sequence[int] = (1, 8),
    candidates: Sequence[int] = ALIGN_CANDIDATES,
    threads: int | None = None,
    warmup: int = 5,
    runs: int = 30,
    opset: int | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """Export ``model`` aligned to every candidate, time them interleaved on ``provider`` and return the
    pick of :func:`pick_alignment` with every candidate's timings.

    The score is the geometric mean over ``batches`` of the p50 latency (each batch size counts alike,
    whatever its absolute time). Candidates that give the same widths as a smaller one are not timed
    twice (``same_as`` names it).
    """
    from slimkit.deploy.bench import bench
    from slimkit.deploy.export import DEFAULT_OPSET, to_verified_onnx
    from slimkit.deploy.runners import PROVIDERS, check_trial, onnx_runner, torch_runner

    if provider not in PROVIDERS:
        raise SlimkitError(f"unknown provider {provider!r}; available: {', '.join(PROVIDERS)}")
    cands = sorted({check_align(c) for c in candidates if c != "auto"})
    if not cands:
        raise SlimkitError("choose_alignment needs at least one candidate multiple")
    shape = tuple(input_shape) if input_shape is not None else tuple(spec_of(model).input_shape)
    nets, rows, firsts = {}, [], {}
    for c in cands:
        net = align_network(model, c)
        widths = tuple(layer_widths(net).values())
        rows.append({"align": c, "params": sum(p.numel() for p in net.parameters())})
        if widths in firsts:
            rows[-1]["same_as"] = firsts[widths]
        else:
            firsts[widths] = c
            nets[c] = net
    with tempfile.TemporaryDirectory() as tmp:
        runners = []
        for c, net in nets.items():
            if provider == "torch":
                r = torch_runner(net, f"align{c}", "cpu", threads or usable_cpus(), shape)
            else:
                v = to_verified_onnx(net, shape, opset or DEFAULT_OPSET, reference=model)
                path = Path(tmp) / f"align{c}.onnx"
                path.write_bytes(v.data)
                r = onnx_runner(path, provider, threads, shape, batches)
                r.name = f"align{c}"
            runners.append(check_trial(r))
        results = bench(runners, batches, warmup=warmup, runs=runs, threads=threads)
    by = {(r.model, r.batch): r for r in results}
    for row in rows:
        c = row.get("same_as", row["align"])
        row["p50_ms"] = {str(b): by[(f"align{c}", b)].p50_ms for b in batches}
        row["p90_ms"] = {str(b): by[(f"align{c}", b)].p90_ms for b in batches}
        row["score_ms"] = statistics.geometric_mean(row["p50_ms"].values())
    best, why = pick_alignment(rows, cpu_block(provider))
    for row in rows:
        row["picked"] = row["align"] == best
    rows[0]["why"] = why
    return best, rows


AUTO_NOISE = 0.05  # scores within 5% of the fastest (or its own p50 -> p90 spread, if wider) are a tie


def cpu_block(provider: str) -> int | None:
    """The channel block of this CPU's vector width for ONNX Runtime's / torch's blocked conv kernels:
    16 with AVX-512, 8 with AVX2, None otherwise and for GPU providers."""
    if provider not in ("cpu", "torch"):
        return None
    from slimkit.deploy.quantize import cpu_flags

    flags = cpu_flags()[1]
    return 16 if "avx512f" in flags else 8 if "avx2" in flags else None


def pick_alignment(rows: Sequence[dict[str, Any]], block: int | None) -> tuple[int, str]:
    """The multiple ``--align auto`` keeps from timed candidates (``align``, ``score_ms``, ``p50_ms``,
    ``p90_ms`` per batch): the fastest, unless it is within the timing noise of the candidate equal to
    the CPU's vector ``block``, which is then kept. Noise: AUTO_NOISE, or the fastest candidate's own
    spread (geometric mean over batches of p90/p50 - 1) when that is wider. On a loaded machine the
    multiples 8, 16 and 32 time within noise of each other and the plain fastest changes from run to run;
    the block is the width the kernels are built for (aligned to 16 beat dense and slim in 18 of 18
    AVX-512 measurements, ``benchmarks/results/align_sr0.8*.md``). Returns the multiple and why."""
    fastest = min(rows, key=lambda r: (r["score_ms"], r["align"]))
    spread = statistics.geometric_mean([fastest["p90_ms"][b] / fastest["p50_ms"][b] for b in fastest["p50_ms"]]) - 1
    margin = max(AUTO_NOISE, spread)
    native = next((r for r in rows if r["align"] == block), None)
    if native is not None and native is not fastest and native["score_ms"] <= fastest["score_ms"] * (1 + margin):
        return block, (f"{block} (this CPU's vector block) is within {100 * margin:.0f}% of the fastest, "
                       f"{fastest['align']} ({native['score_ms']:.3g} vs {fastest['score_ms']:.3g} ms)")
    return fastest["align"], f"{fastest['align']} is the fastest ({fastest['score_ms']:.3g} ms)" + (
        f", more than {100 * margin:.0f}% ahead of {block}, this CPU's vector block" if native is not None
        and native is not fastest else "")


def align_for_export(model: nn.Module, align: int | str, input_shape: Sequence[int], provider: str = "cpu",
                     opset: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The aligned network an export writes, and what the export reports and records about it.

    ``align`` is a multiple or ``"auto"`` (time ALIGN_CANDIDATES on ``provider``, keep the fastest).
    The dict holds ``multiple``, ``mode``, per-layer ``widths`` (dense, slim, aligned) of the cut
    layers, MACs of slim and aligned, auto's ``timings``, the ONNX ``metadata`` entries and a
    ``summary`` line.
    """
    import json

    from slimkit.core.cost import count_macs

    align = check_align(align)
    timings = None
    if align == "auto":
        multiple, timings = choose_alignment(model, input_shape, provider=provider, opset=opset)
    else:
        multiple = align
    aligned = align_network(model, multiple)
    shape = tuple(input_shape)
    dense = layer_widths(_dense_source(model)) if plans_of(model) else layer_widths(model)
    slim_w, al_w = layer_widths(model), layer_widths(aligned)
    widths = {n: [dense[n], slim_w[n], al_w[n]] for n in slim_w if slim_w[n] != dense[n]}
    padded = {n: w for n, w in widths.items() if w[2] != w[1]}
    macs = {"slim": count_macs(model, shape), "aligned": count_macs(aligned, shape)}
    changes = list(dict.fromkeys(f"{w[1]}->{w[2]}" for w in padded.values()))
    how = "auto" if timings is not None else "fixed"
    summary = (f"aligned to multiples of {multiple}" + (f" (auto on {provider}: geometric-mean p50 over batches "
               + ", ".join(f"{r['align']}: {r['score_ms']:.2f} ms" for r in timings) + f"; kept {timings[0]['why']})"
               if timings else "")
               + f": {len(padded)} of {len(widths)} cut layers padded ("
               + (", ".join(changes[:8]) + (", ..." if len(changes) > 8 else "") if changes else "none")
               + f"); MACs {macs['slim'] / 1e6:,.1f} M -> {macs['aligned'] / 1e6:,.1f} M; verified against the "
               "unpadded network")
    metadata = {"slimkit.align": str(multiple), "slimkit.align_mode": how,
                "slimkit.align_widths": json.dumps({n: w[2] for n, w in padded.items()})}
    if timings is not None:
        metadata["slimkit.align_timings"] = json.dumps({"provider": provider, "score": "geometric mean of p50 "
                                                        "over batches", "candidates": timings})
    info = {"multiple": multiple, "mode": how, "widths": widths, "padded_layers": len(padded),
            "cut_layers": len(widths), "macs": macs, "timings": timings, "metadata": metadata, "summary": summary}
    return aligned, info
