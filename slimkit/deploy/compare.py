"""`slimkit compare`: dense network vs its fit hypothesis, in one command.

Parameters, MACs, ONNX size, latency per batch on one provider (interleaved), speed-up against
the MAC ratio (the physical limit of the saving), and accuracy when a dataset is given.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from slimkit.core.cost import count_params
from slimkit.core.errors import SlimkitError
from slimkit.core.fileio import atomic_write, check_output
from slimkit.core.globalstate import keep_global_state
from slimkit.deploy.bench import bench, plot
from slimkit.deploy.export import onnx_metadata, to_verified_onnx
from slimkit.deploy.runners import check_trial, onnx_runner, torch_runner
from slimkit.models.checkpoint import source
from slimkit.models.hypothesis import fit_hypothesis
from slimkit.models.registry import run_at, spec_of

__all__ = ["CompareReport", "compare", "default_compare_dir", "unaligned_widths"]


@dataclasses.dataclass
class CompareReport:
    source: str
    arch: str
    input_shape: list[int]
    split_rate: float | None
    provider: str
    device: str
    threads: int
    dense: dict[str, Any]  # params, macs, onnx_bytes, accuracy (None without --data)
    slim: dict[str, Any]
    latency: list[dict[str, Any]]  # per batch: dense/slim p50, speed-up, latency ratio vs MAC ratio
    verify: dict[str, float]
    bench: list[dict[str, Any]]
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)  # advice derived from the networks' shapes
    profile: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # --profile: ORT-CPU time by node kind

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def markdown(self) -> str:
        d, s = self.dense, self.slim
        rate = f"split rate {self.split_rate:g}" if self.split_rate is not None else "split from the file's masks"
        lines = [
            f"## {self.arch}: dense vs KELS fit hypothesis ({rate})",
            "",
            f"source `{self.source}`, input {'x'.join(map(str, self.input_shape))}, provider {self.provider}, "
            f"{self.device}, {self.threads} threads",
            "",
            "| | dense | slim | slim/dense |",
            "|---|---:|---:|---:|",
            f"| parameters | {d['params']:,} | {s['params']:,} | {s['params'] / d['params']:.3f} |",
            f"| MACs | {d['macs'] / 1e6:,.1f} M | {s['macs'] / 1e6:,.1f} M | {s['macs'] / d['macs']:.3f} |",
            f"| ONNX size | {d['onnx_bytes'] / 2**20:.2f} MB | {s['onnx_bytes'] / 2**20:.2f} MB | "
            f"{s['onnx_bytes'] / d['onnx_bytes']:.3f} |",
        ]
        if d.get("accuracy") is not None:
            lines.append(f"| accuracy ({d['data']}, n={d['n']}) | {100 * d['accuracy']:.2f}% | {100 * s['accuracy']:.2f}% | "
                         f"{100 * (s['accuracy'] - d['accuracy']):+.2f} points |")
        for row in self.latency:
            lines.append(f"| p50 latency, batch {row['batch']} | {row['dense_p50_ms']:.2f} ms | {row['slim_p50_ms']:.2f} ms | "
                         f"{row['latency_ratio']:.3f} |")
        lines += [
            "",
            "| batch | speed-up (dense/slim) | latency ratio | MAC ratio | latency ratio / MAC ratio |",
            "|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| {r['batch']} | {r['speedup']:.2f}x | {r['latency_ratio']:.3f} | {r['mac_ratio']:.3f} | "
                  f"{r['latency_over_mac']:.2f} |" for r in self.latency]
        lines += ["", f"slim == masked dense: max abs diff {self.verify['max_abs_diff']:.2e}; ONNX == torch: "
                      f"dense {self.verify['onnx_dense_rel']:.1e}, slim {self.verify['onnx_slim_rel']:.1e} (relative)"]
        if self.profile:
            from slimkit.deploy.profile import format_profile

            lines += ["", "### Where the time goes (ONNX Runtime CPU profile, kernel time per run)", ""]
            lines += format_profile(self.profile)
            lines += ["", "A kind whose time ratio follows its MAC ratio is compute-bound; one that follows its "
                          "activation ratio is memory-bound; plain-NCHW convs and layout reorders appear when "
                          "widths do not fit ORT's blocked kernels."]
        lines += [f"\nNote: {n}" for n in self.notes]
        return "\n".join(lines)


def unaligned_widths(dense, slim, block: int = 8) -> tuple[list[int], int]:
    """Slim conv widths that are not multiples of ``block`` where the dense width was; and how many convs.

    ONNX Runtime's CPU convs run in a blocked NCHWc layout only when channel counts fit its SIMD
    block (8, or 16 with AVX-512); other widths fall back to plain NCHW plus layout reorders.
    """
    from torch import nn

    bad = [s.out_channels for d, s in zip(dense.modules(), slim.modules())
           if isinstance(d, nn.Conv2d) and d.out_channels % block == 0 and s.out_channels % block]
    return sorted(set(bad)), len(bad)


def default_compare_dir(ckpt: Path) -> Path:
    """``a.v1.pt`` -> ``a.v1.compare`` beside it (only the last suffix goes: a.v2.pt gets its own)."""
    return ckpt.with_suffix(".compare") if ckpt.suffix else ckpt.with_name(ckpt.name + ".compare")


@keep_global_state()  # module constructors draw from the global generator; runners set threads
def compare(
    ckpt: str | Path | Any,
    split_rate: float | None = None,
    data: str | None = None,
    batches: Sequence[int] = (1, 8),
    provider: str = "cpu",
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 50,
    out: str | Path | None = None,
    force: bool = False,
    arch: str | None = None,
    num_classes: int | None = None,
    model_args: dict[str, Any] | None = None,
    profile: bool = False,
    precision: str | Sequence[str] | None = None,
    align: int | str | None = None,
    calib: str | None = None,
    calib_size: int | None = None,
    max_drop: float = 1.0,
    ema: bool = False,
    state_key: str | None = None,
    input_shape: Sequence[int] | None = None,
) -> Any:
    """Dense vs fit hypothesis of ``ckpt`` (a checkpoint file, or an ``nn.Module`` slimkit created: then
    ``out`` is required); writes compare.md/.json/.png into ``out``.

    ``profile`` adds ONNX Runtime's CPU kernel time by node kind for both networks at every batch
    (:mod:`slimkit.deploy.profile`): where the slim network saves less than its MACs, and why.

    ``precision`` (e.g. 'fp32,fp16,int8') or ``align`` ('auto' or a multiple) makes it the deployment
    table (:mod:`slimkit.deploy.table`, a :class:`~slimkit.deploy.table.TableReport`): dense and slim
    (and slim padded to aligned widths) at each precision, INT8 calibrated on ``calib``, and the
    fastest artefact whose accuracy on ``data`` is within ``max_drop`` points of dense fp32 picked.
    ``ema``/``state_key`` pick the weights in a training checkpoint (see :func:`slimkit.read`).
    ``input_shape`` (C, H, W): the input both networks are built, verified, exported and timed at
    (default: a slimkit checkpoint's recorded input, else the model source's).
    """
    import torch

    from slimkit.deploy.export import parse_input_shape
    from slimkit.deploy.runners import PROVIDERS

    t0 = time.perf_counter()
    is_object = isinstance(ckpt, torch.nn.Module)
    if is_object and out is None:
        raise SlimkitError("compare of a network object needs out=DIR (there is no file to write beside)")
    if not is_object:
        ckpt = Path(ckpt)
    if provider not in PROVIDERS:
        raise SlimkitError(f"unknown provider {provider!r}; available: {', '.join(PROVIDERS)}")
    if profile and provider != "cpu":
        raise SlimkitError(f"--profile reads ONNX Runtime's CPU profile; it needs --provider cpu, not {provider}")
    table = precision is not None or align is not None
    if table:
        from slimkit.deploy.table import check_table_request, parse_align, parse_precisions

        precisions, align = parse_precisions(precision or "fp32"), parse_align(align)
        check_table_request(precisions, provider, calib)
        if profile:
            raise SlimkitError("--profile goes with the dense-vs-slim report, not with --precision/--align")
    elif calib is not None or calib_size is not None:
        raise SlimkitError("--calib and --calib-size go with --precision ...,int8")
    out_dir = Path(out) if out is not None else default_compare_dir(ckpt)
    if out_dir.exists() and not out_dir.is_dir():
        raise SlimkitError(f"output {out_dir} exists and is not a directory")
    if not is_object and not ckpt.exists():
        raise SlimkitError(f"no such file: {ckpt}")
    paths = {ext: out_dir / f"compare.{ext}" for ext in ("md", "json", "png")}
    if out_dir.is_dir():
        for p in paths.values():
            check_output(p, force)
    elif not out_dir.parent.is_dir():
        raise SlimkitError(f"cannot create {out_dir}: directory {out_dir.parent} does not exist")

    given = parse_input_shape(input_shape) if input_shape is not None else None
    src = source(ckpt, input_shape=given) if is_object else source(
        ckpt, arch=arch, num_classes=num_classes, model_args=model_args, ema=ema, state_key=state_key,
        input_shape=given)
    run_at(src.model, given)
    fh = fit_hypothesis(src, split_rate)
    spec = spec_of(src.model)
    shape = tuple(spec.input_shape)
    dataset = None
    if data is not None:  # load (and validate) the data before minutes of timing
        from slimkit.data.images import eval_dataset

        dataset = eval_dataset(data, shape, src.meta, spec.args.get("num_classes"))
    if table:
        from slimkit.deploy.table import deployment_table

        rep = deployment_table(
            src, fh, f"<{type(ckpt).__name__} object>" if is_object else str(ckpt), spec.arch, shape, precisions,
            batches, dataset, data, calib, calib_size, max_drop, align, provider, threads, warmup, runs)
        out_dir.mkdir(exist_ok=True)  # created only now: a refused run leaves nothing behind
        text, payload = rep.markdown() + "\n", json.dumps(rep.to_json(), indent=2) + "\n"
        atomic_write(paths["md"], lambda t: t.write_text(text), force=force)
        atomic_write(paths["json"], lambda t: t.write_text(payload), force=force)
        rep.plot(paths["png"], force=force)
        return rep

    with tempfile.TemporaryDirectory() as tmp:
        onnx = {}
        for name, model in (("dense", fh.dense), ("slim", fh.slim)):
            meta = onnx_metadata(model, shape, src.meta.get("split"), src.sha256, False)
            onnx[name] = to_verified_onnx(model, shape, meta=meta)
            (Path(tmp) / f"{name}.onnx").write_bytes(onnx[name].data)
        if provider == "torch":
            runners = [torch_runner(fh.dense, "dense", "cpu", threads), torch_runner(fh.slim, "slim", "cpu", threads)]
        else:
            runners = [onnx_runner(Path(tmp) / f"{n}.onnx", provider, threads, None, batches) for n in ("dense", "slim")]
            for r, n in zip(runners, ("dense", "slim")):
                r.name = n
        for r in runners:
            check_trial(r)
        results = bench(runners, batches, warmup=warmup, runs=runs, threads=threads)
        profiled = []
        if profile:
            from slimkit.deploy.profile import profile_rows

            for b in batches:
                profiled += profile_rows(fh.dense, fh.slim, Path(tmp) / "dense.onnx", Path(tmp) / "slim.onnx", shape, b,
                                         runs, results[0].threads, tmp)

    by = {(r.model, r.batch): r for r in results}
    mac_ratio = fh.slim_macs / fh.dense_macs
    latency = []
    for b in batches:
        dn, sl = by[("dense", b)], by[("slim", b)]
        ratio = sl.p50_ms / dn.p50_ms
        latency.append({"batch": b, "dense_p50_ms": dn.p50_ms, "slim_p50_ms": sl.p50_ms, "speedup": 1 / ratio,
                        "latency_ratio": ratio, "mac_ratio": mac_ratio, "latency_over_mac": ratio / mac_ratio})
    dense = {"params": count_params(fh.dense), "macs": fh.dense_macs, "onnx_bytes": len(onnx["dense"].data)}
    slim = {"params": count_params(fh.slim), "macs": fh.slim_macs, "onnx_bytes": len(onnx["slim"].data)}
    if dataset is not None:
        from slimkit.engine.evaluate import accuracy

        for d, model in ((dense, fh.dense), (slim, fh.slim)):
            d.update(accuracy=accuracy(model, dataset), data=data, n=len(dataset))
    rep = CompareReport(
        source=f"<{type(ckpt).__name__} object>" if is_object else str(ckpt), arch=spec.arch, input_shape=list(shape), split_rate=fh.split_rate,
        provider=results[0].provider, device=results[0].device, threads=results[0].threads,
        dense=dense, slim=slim, latency=latency,
        verify={"max_abs_diff": fh.max_abs_diff, "onnx_dense_rel": onnx["dense"].max_rel_diff,
                "onnx_slim_rel": onnx["slim"].max_rel_diff},
        bench=[dataclasses.asdict(r) for r in results], seconds=time.perf_counter() - t0, profile=profiled,
    )
    bad, n_bad = unaligned_widths(fh.dense, fh.slim)
    if bad and provider in ("cpu", "torch"):
        shown = ", ".join(map(str, bad[:6])) + (", …" if len(bad) > 6 else "")
        rep.notes.append(
            f"{n_bad} slim conv layer(s) have widths that are not multiples of 8 ({shown}). On CPU, ONNX Runtime runs "
            "such convs outside its blocked kernels, which can make the slim network slower than its MACs say "
            "(benchmarks/README.md measured sr 0.8 ResNets no faster than dense). Export the extracted slim network "
            "with `slimkit export SLIM.pt -o OUT.onnx --align auto` (or --align 16): it pads them with zero channels "
            "to aligned widths, the same function without retraining (benchmarks/results/align_sr0.8.md).")
    out_dir.mkdir(exist_ok=True)  # created only now: a refused run leaves nothing behind
    text = rep.markdown() + "\n"
    atomic_write(paths["md"], lambda t: t.write_text(text), force=force)
    payload = json.dumps(rep.to_json(), indent=2) + "\n"
    atomic_write(paths["json"], lambda t: t.write_text(payload), force=force)
    plot(results, paths["png"], title=f"{spec.arch}: dense vs slim, {rep.provider}", force=force)
    return rep
