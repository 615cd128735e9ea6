"""The deployment table (`slimkit compare --precision ...`): dense and slim (and slim at aligned widths)
at each precision, exported and checked, timed interleaved in one bench run, and the fastest artefact
within the accuracy budget picked.

An fp32/fp16 file is verified against PyTorch (:func:`slimkit.deploy.export.to_verified_onnx`), an INT8
file by accuracy (:mod:`slimkit.deploy.quantize`); accuracy is measured for every file in ONNX Runtime's
CPU provider on the same held-out images.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

from slimkit.core.errors import SlimkitError

__all__ = ["PRECISIONS", "TableReport", "parse_precisions", "parse_align", "pick_artefact", "check_table_request",
           "deployment_table"]

PRECISIONS = ("fp32", "fp16", "int8")


def parse_precisions(text: str | Sequence[str]) -> list[str]:
    """'fp32,fp16,int8' -> ['fp32', 'fp16', 'int8'] (fp32 always included: it is the reference)."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in items if t not in PRECISIONS]
    if not items or bad:
        raise SlimkitError(f"--precision takes a comma-separated list of {', '.join(PRECISIONS)}, got {text!r}")
    return ["fp32"] + [p for p in PRECISIONS[1:] if p in items]


def parse_align(value: str | int | None) -> int | str | None:
    """``--align``: None, 'auto' or a positive integer (1: no padding); see :func:`slimkit.deploy.align.check_align`."""
    from slimkit.deploy.align import check_align

    return None if value is None else check_align(value)


def pick_artefact(rows: Sequence[dict[str, Any]], max_drop: float, reference: str = "dense fp32") -> tuple[str, str]:
    """The fastest row (highest ``speedup``) whose ``accuracy`` is at least the reference row's minus
    ``max_drop`` points; without accuracies, the fastest. Ties go to the smaller file. Returns
    (name, why). Rows missing an accuracy when the reference has one never qualify."""
    ref = next(r for r in rows if r["name"] == reference)
    if ref.get("accuracy") is None:
        best = max(rows, key=lambda r: (r["speedup"], -r["bytes"]))
        return best["name"], "fastest by latency only (no --data: accuracy not measured)"
    floor = ref["accuracy"] - max_drop / 100
    ok = [r for r in rows if r.get("accuracy") is not None and r["accuracy"] >= floor - 1e-12]
    ranked = sorted(ok, key=lambda r: (r["speedup"], -r["bytes"]), reverse=True)  # the reference always qualifies
    best = ranked[0]
    lead = "" if len(ranked) < 2 else (f"; {100 * (best['speedup'] / ranked[1]['speedup'] - 1):.0f}% ahead of the "
                                       f"next one within budget, {ranked[1]['name']}")
    return best["name"], (f"fastest with accuracy >= {100 * floor:.2f}% ({reference} {100 * ref['accuracy']:.2f}% "
                          f"- {max_drop:g} points){lead}")


@dataclasses.dataclass
class TableReport:
    source: str
    arch: str
    input_shape: list[int]
    split_rate: float | None
    provider: str
    device: str
    cpu_flags: list[str]
    threads: int
    runs: int
    batches: list[int]
    max_drop: float
    data: str | None
    rows: list[dict[str, Any]]  # one per artefact: name, network, precision, params, bytes, accuracy, per batch
    pick: str
    pick_why: str
    align: dict[str, Any] | None
    int8: dict[str, Any] | None  # settings and calibration
    bench: list[dict[str, Any]]
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def markdown(self) -> str:
        rate = f"split rate {self.split_rate:g}" if self.split_rate is not None else "split from the file's masks"
        acc = self.data is not None
        head = "| artefact | params | file | " + ("accuracy | vs dense fp32 | " if acc else "")
        head += " | ".join(f"p50 / p90 ms, batch {b} | speed-up" for b in self.batches) + " | within budget |"
        lines = [
            f"## {self.arch}: deployment table ({rate})", "",
            f"source `{self.source}`, input {'x'.join(map(str, self.input_shape))}, provider {self.provider}, "
            f"{self.device} ({', '.join(self.cpu_flags) or 'no int8 flags'}), {self.threads} threads, "
            f"{self.runs} timed runs per artefact and batch, all artefacts interleaved in one run", "",
            head, "|---|---:|---:|" + ("---:|---:|" if acc else "") + "---:|---:|" * len(self.batches) + ":---:|",
        ]
        for r in self.rows:
            name = f"**{r['name']}** (pick)" if r["name"] == self.pick else r["name"]
            cells = [name, f"{r['params'] / 1e6:.3f} M", f"{r['bytes'] / 2**20:.2f} MB"]
            if acc:
                cells += [f"{100 * r['accuracy']:.2f}%", f"{100 * (r['accuracy'] - self.rows[0]['accuracy']):+.2f}"]
            for b in r["latency"]:
                cells += [f"{b['p50_ms']:.2f} / {b['p90_ms']:.2f}", f"{b['speedup']:.2f}x"]
            cells.append("yes" if r["within_budget"] else "no")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"**Pick: {self.pick}**: {self.pick_why}; speed-up is p50 against dense fp32 "
                      f"(ranked by its geometric mean over batches {', '.join(map(str, self.batches))})."]
        checks = "; ".join(f"{r['name']}: {r['check']}" for r in self.rows)
        lines += ["", f"Checks: {checks}."]
        if self.int8:
            s, c = self.int8["settings"], self.int8["calibration"]
            lines += ["", f"INT8: {s['format']} {s['activations']} activations / {s['weights']} per-channel weights, "
                          f"reduce_range {s['reduce_range']}, {s['calibration']} calibration on {c['images']} images of "
                          f"{c['source']}" + (f" ({c['split']} split)" if c["split"] else "") + f": {s['why']}."]
        if self.align:
            lines += ["", f"Alignment: {self.align['summary']}."]
        lines += [f"\nNote: {n}." for n in self.notes]
        return "\n".join(lines)

    def plot(self, path: str | Path, force: bool = False) -> None:
        """Latency (p50 at the largest batch) against accuracy, one point per artefact; the pick starred."""
        from slimkit.core.fileio import atomic_write
        from slimkit.core.plots import figure

        fig, ax = figure(size=(6.5, 4.2))
        b = self.batches[-1]
        acc = self.data is not None
        placed: list[tuple[float, float]] = []
        for i, r in enumerate(self.rows):
            x = r["latency"][-1]["p50_ms"]
            y = 100 * r["accuracy"] if acc else i
            pick = r["name"] == self.pick
            ax.scatter([x], [y], marker="*" if pick else "o", s=160 if pick else 40,
                       color="C3" if pick else ("C0" if r["within_budget"] else "0.6"), zorder=3)
            near = sum(abs(math.log(x / px)) < 0.08 and abs(y - py) < 0.05 * (abs(py) + 1) for px, py in placed)
            placed.append((x, y))  # labels of points on top of each other are stacked, not overprinted
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 4 - 10 * near), fontsize=8)
        if acc:
            floor = 100 * self.rows[0]["accuracy"] - self.max_drop
            ax.axhline(floor, color="C3", lw=0.8, ls="--", label=f"budget: dense fp32 - {self.max_drop:g} points")
            ax.set_ylabel(f"accuracy on {self.data} (%)")
            ax.legend(fontsize=8, loc="lower right")
        else:
            ax.set_yticks([])
            ax.set_ylabel("artefacts (no --data: accuracy not measured)")
        ax.set_xscale("log")
        ax.set_xlabel(f"p50 latency at batch {b} (ms, log scale)")
        ax.set_title(f"{self.arch}: {'latency vs accuracy' if acc else 'latency per artefact'}, {self.provider}",
                     fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), force=force)
        fig.clf()


def check_table_request(precisions: Sequence[str], provider: str, calib: str | None) -> None:
    """Refusals that need no network: a provider that cannot run the files, INT8 without calibration."""
    from slimkit.deploy.quantize import check_int8_provider

    if provider == "torch":
        raise SlimkitError("--provider torch runs checkpoints in torch; the deployment table (--precision/--align) "
                           "times ONNX files: choose --provider cpu, cuda or tensorrt")
    if "int8" in precisions:
        check_int8_provider(provider)
        if calib is None:
            raise SlimkitError("--precision int8 needs --calib DATA: calibration images ('digits', an image "
                               "directory or a .npy array of preprocessed inputs)")
    elif calib is not None:
        raise SlimkitError("--calib and --calib-size go with --precision ...,int8")


def _networks(fh, align: int | str | None, shape, provider: str, batches, threads) -> tuple[list, dict | None]:
    """(name, model, multiple) of the networks in the table, and what the alignment step chose."""
    nets = [("dense", fh.dense, None), ("slim", fh.slim, None)]
    if align is None:
        return nets, None
    from slimkit.deploy.align import align_network, choose_alignment

    info: dict[str, Any] = {"requested": align}
    if align == "auto":
        multiple, timed = choose_alignment(fh.slim, shape, provider=provider, batches=tuple(batches), threads=threads)
        info.update(chosen=multiple, candidates=timed)
        scores = ", ".join(f"{r['align']}: {r['score_ms']:.2f} ms" for r in timed if "same_as" not in r)
        how = (f"--align auto timed the candidates on {provider} (geometric-mean p50 over batches: {scores}; "
               f"a multiple giving the same widths as a smaller one is not timed again) and kept {timed[0]['why']}")
    else:
        multiple = int(align)
        info["chosen"] = multiple
        how = f"--align {multiple}"
    if multiple > 1:
        nets.append((f"slim a{multiple}", align_network(fh.slim, multiple), multiple))
        info["summary"] = f"{how}: slim widths padded with zero channels to multiples of {multiple} (slim a{multiple})"
    else:
        info["summary"] = f"{how}: the unpadded slim widths (no aligned artefact)"
    return nets, info


def deployment_table(src, fh, source: str, arch: str, shape: Sequence[int], precisions: Sequence[str], batches: Sequence[int],
                     dataset=None, data: str | None = None, calib: str | None = None, calib_size: int | None = None,
                     max_drop: float = 1.0, align: int | str | None = None, provider: str = "cpu",
                     threads: int | None = None, warmup: int = 10, runs: int = 50, seed: int = 0) -> TableReport:
    """Build, check and time every artefact of the fit hypothesis ``fh`` of ``src`` (see the module)."""
    import time

    from slimkit.core.cost import count_macs, count_params
    from slimkit.deploy.bench import bench
    from slimkit.deploy.export import onnx_metadata, to_verified_onnx
    from slimkit.deploy.quantize import (
        DEFAULT_CALIB_SIZE,
        Int8Request,
        calibration_inputs,
        choose_int8_settings,
        cpu_flags,
        ort_accuracy,
        to_int8,
    )
    from slimkit.deploy.runners import check_trial, onnx_runner

    t0 = time.perf_counter()
    check_table_request(precisions, provider, calib)
    machine, flags = cpu_flags()
    request = None
    if "int8" in precisions:  # calibration images loaded and checked before any export or timing
        cal = calibration_inputs(calib, shape, src.meta, _classes(fh.dense), calib_size or DEFAULT_CALIB_SIZE, seed)
        request = Int8Request(cal, choose_int8_settings(machine, flags), max_drop=max_drop)
    nets, align_info = _networks(fh, align, shape, provider, batches, threads)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for net, model, multiple in nets:
            meta = onnx_metadata(fh.slim if multiple else model, shape, src.meta.get("split"), src.sha256, False)
            if multiple:
                meta["slimkit.align"] = str(multiple)
            params, macs = count_params(model), count_macs(model, tuple(shape))
            fp32 = None
            for prec in precisions:
                name = f"{net} {prec}"
                if prec == "int8":
                    q = to_int8(fp32, request, meta, refuse=False)
                    payload, check = q.data, f"INT8 top-1 agreement with fp32 on calibration images {100 * q.agreement:.1f}%"
                else:
                    m = dict(meta, **{"slimkit.precision": prec})
                    # a padded network must compute the unpadded slim network's function
                    v = to_verified_onnx(model, shape, fp16=prec == "fp16", meta=m,
                                         reference=fh.slim if multiple else None)
                    payload, check = v.data, f"ONNX vs torch {v.max_rel_diff:.1e}"
                    if prec == "fp32":
                        fp32 = v.data
                path = Path(tmp) / f"{name.replace(' ', '_')}.onnx"
                path.write_bytes(payload)
                row = {"name": name, "network": net, "precision": prec, "align": multiple, "params": params,
                       "macs": macs, "bytes": len(payload), "check": check, "file": path}
                if dataset is not None:
                    row.update(accuracy=ort_accuracy(payload, dataset), n=len(dataset))
                rows.append(row)
        runners = []
        for r in rows:
            runner = onnx_runner(r.pop("file"), provider, threads, tuple(shape), batches)
            runner.name = r["name"]
            runners.append(check_trial(runner))
        results = bench(runners, batches, warmup=warmup, runs=runs, threads=threads)

    by = {(res.model, res.batch): res for res in results}
    for r in rows:
        r["latency"] = []
        for b in batches:
            res, ref = by[(r["name"], b)], by[("dense fp32", b)]
            r["latency"].append({"batch": b, "p50_ms": res.p50_ms, "p90_ms": res.p90_ms, "p99_ms": res.p99_ms,
                                 "speedup": ref.p50_ms / res.p50_ms})
        r["speedup"] = math.exp(sum(math.log(x["speedup"]) for x in r["latency"]) / len(r["latency"]))
    pick, why = pick_artefact(rows, max_drop)
    floor = None if dataset is None else rows[0]["accuracy"] - max_drop / 100
    for r in rows:
        r["within_budget"] = floor is None or r["accuracy"] >= floor - 1e-12
        r["pick"] = r["name"] == pick
    rep = TableReport(
        source=source, arch=arch,
        input_shape=list(shape), split_rate=fh.split_rate, provider=results[0].provider, device=results[0].device,
        cpu_flags=flags, threads=results[0].threads, runs=runs, batches=list(batches), max_drop=max_drop, data=data,
        rows=rows, pick=pick, pick_why=why, align=align_info,
        int8=None if request is None else {"settings": request.settings.to_json(),
                                          "calibration": request.calibration.to_json()},
        bench=[dataclasses.asdict(res) for res in results], seconds=time.perf_counter() - t0,
    )
    rep.notes += _notes(rep, by)
    return rep


def _classes(model) -> int | None:
    spec = getattr(model, "slimkit_spec", None)
    return None if spec is None else spec.args.get("num_classes")


def _notes(rep: TableReport, by: dict) -> list[str]:
    notes = []
    if rep.data is None:
        notes.append("no --data: accuracy was not measured, and the pick is by latency only; fp16 is bounded "
                     "against torch and INT8 only checked for agreement with fp32 on the calibration images")
    cal = (rep.int8 or {}).get("calibration") or {}
    if rep.data is not None and cal.get("split") == "test" and cal.get("source") == rep.data:
        notes.append(f"{rep.data} has no training split, so INT8 was calibrated on images it is also scored on; "
                     "calibrate on other images (--calib) for an independent accuracy")
    per_batch = {b: max(rep.rows, key=lambda r, i=i: (r["within_budget"], r["latency"][i]["speedup"]))["name"]
                 for i, b in enumerate(rep.batches)}
    if len(set(per_batch.values())) > 1:
        notes.append("the fastest artefact within budget depends on the batch: "
                     + ", ".join(f"batch {b}: {n}" for b, n in per_batch.items()))
    fp16 = [(r, next(x for x in rep.rows if x["network"] == r["network"] and x["precision"] == "fp32"))
            for r in rep.rows if r["precision"] == "fp16"]
    if fp16 and rep.provider == "CPUExecutionProvider":
        ratios = [r["latency"][-1]["p50_ms"] / f["latency"][-1]["p50_ms"] for r, f in fp16]
        notes.append(f"fp16 on ONNX Runtime's CPU provider: {min(ratios):.2f}-{max(ratios):.2f}x the fp32 latency of "
                     f"the same network at batch {rep.batches[-1]}, as measured here (fp16 is meant for GPUs; on a "
                     "CPU it mainly halves the file)")
    return notes
