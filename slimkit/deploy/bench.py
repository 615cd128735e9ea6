"""`slimkit bench`: latency and throughput of ONNX files (ONNX Runtime) and checkpoints (torch eager).

Models compared in one run are timed interleaved, in short blocks (A A A A A, B B B B B, then
B..., A..., and so on) so drift of the machine (turbo, thermal, other load) hits them alike. Before
each block the runner waits ``settle`` seconds and runs once untimed: every ONNX Runtime session
owns a thread pool whose workers spin for a while after a run, and torch's OpenMP threads do too,
so a model timed right after another one shares the CPU with the previous model's spinning threads.
Measured on a 2-vCPU machine (benchmarks/README.md): resnet18 at batch 1 took 10 ms alone and
19-32 ms when timed run-by-run after two other sessions; with a 50 ms settle and a warm run it is
back to its alone figure. onnxruntime and matplotlib are imported where used.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from slimkit.core.errors import SlimkitError
from slimkit.core.fileio import atomic_write, check_output
from slimkit.core.globalstate import keep_global_state, usable_cpus
from slimkit.deploy.runners import Runner, make_runner, peak_memory

log = logging.getLogger("slimkit")

__all__ = ["BenchResult", "BenchReport", "parse_batches", "bench", "bench_files", "format_table", "plot"]


def parse_batches(text: str | Sequence[int]) -> list[int]:
    try:
        batches = [int(b) for b in (text.split(",") if isinstance(text, str) else text)]
    except ValueError as exc:
        raise SlimkitError(f"batch sizes must be comma-separated positive integers like 1,8,32, got {text!r}") from exc
    if not batches or any(b < 1 for b in batches):
        raise SlimkitError(f"batch sizes must be positive integers, got {text!r}")
    return batches


@dataclasses.dataclass
class BenchResult:
    model: str
    engine: str
    provider: str
    device: str
    precision: str
    threads: int
    batch: int
    input_shape: list[int]
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    throughput: float  # images per second at the median latency
    peak_memory_bytes: int | None


def _pct(sorted_ms: list[float], q: float) -> float:
    k = (len(sorted_ms) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (k - lo)


def bench(runners: Sequence[Runner], batches: Sequence[int], warmup: int = 10, runs: int = 50,
          threads: int | None = None, progress: bool = False, block: int = 5,
          settle: float = 0.05) -> list[BenchResult]:
    """Time every runner at every batch size: ``runs`` timed runs each, interleaved in blocks.

    With several runners, each visit to a runner sleeps ``settle`` seconds (other engines' threads
    stop spinning), runs once untimed and then times up to ``block`` runs; visits alternate in
    order A B .. then .. B A. A single runner is timed back to back.
    """
    threads = threads or usable_cpus()
    if not runners:
        return []
    block = max(1, int(block)) if len(runners) > 1 else max(runs, 1)
    results = []
    for batch in batches:
        times: dict[int, list[float]] = {i: [] for i in range(len(runners))}
        for r in runners:
            r.prepare(batch)
            for _ in range(warmup):
                r.run()
        rnd = 0
        while len(times[0]) < runs:
            order = range(len(runners)) if rnd % 2 == 0 else reversed(range(len(runners)))
            for i in order:
                run = runners[i].run
                if len(runners) > 1:
                    if settle > 0:
                        time.sleep(settle)
                    run()  # untimed: wakes this engine's threads
                for _ in range(min(block, runs - len(times[i]))):
                    t = time.perf_counter()
                    run()
                    times[i].append((time.perf_counter() - t) * 1e3)
            rnd += 1
        for i, r in enumerate(runners):
            memory = peak_memory(r)  # not the process's peak over every model timed
            ms = sorted(times[i])
            p50 = _pct(ms, 0.5)
            results.append(BenchResult(
                r.name, r.engine, r.provider, r.device, r.precision, threads, batch, list(r.input_shape), runs,
                p50, _pct(ms, 0.9), _pct(ms, 0.99), statistics.fmean(ms), statistics.pstdev(ms),
                batch / (p50 / 1e3), memory,
            ))
            if progress:
                log.info(f"  {r.name} batch {batch}: p50 {p50:.2f} ms")
    return results


def format_table(results: Sequence[BenchResult]) -> str:
    head = "| model | provider | batch | p50 ms | p90 ms | p99 ms | mean ± std ms | images/s | peak mem |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        mem = f"{r.peak_memory_bytes / 2**20:.0f} MB" if r.peak_memory_bytes else "n/a"
        lines.append(f"| {r.model} | {r.provider} | {r.batch} | {r.p50_ms:.2f} | {r.p90_ms:.2f} | {r.p99_ms:.2f} | "
                     f"{r.mean_ms:.2f} ± {r.std_ms:.2f} | {r.throughput:.1f} | {mem} |")
    first = results[0] if results else None
    if first:
        lines.append("")
        def uniq(attr: str) -> str:
            return ", ".join(dict.fromkeys(str(getattr(r, attr)) for r in results))

        lines.append(f"device: {uniq('device')}; engine {uniq('engine')}; threads {first.threads}; "
                     f"precision {uniq('precision')}; {first.runs} timed runs per point"
                     + (", interleaved in blocks" if len({r.model for r in results}) > 1 else ""))
    return "\n".join(lines)


def plot(results: Sequence[BenchResult], path: str | Path, title: str = "latency vs batch", force: bool = False) -> None:
    from slimkit.core.plots import figure

    fig, ax = figure(size=(6, 4))
    for name in dict.fromkeys(r.model for r in results):
        pts = [(r.batch, r.p50_ms) for r in results if r.model == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), force=force)
    fig.clf()


@dataclasses.dataclass
class BenchReport:
    """What `slimkit bench` measured: one :class:`BenchResult` per model and batch size."""

    results: list[BenchResult]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"results": [dataclasses.asdict(r) for r in self.results], "seconds": self.seconds}

    def table(self) -> str:
        return format_table(self.results)


@keep_global_state()  # module constructors draw from the global generator; runners set threads
def bench_files(models: Sequence[Any], batch: str | Sequence[int] = (1, 8), provider: str = "cpu",
                threads: int | None = None, input_shape: str | Sequence[int] | None = None, torch_fp16: bool = False,
                channels_last: bool = False, source: dict[str, Any] | None = None, warmup: int = 10, runs: int = 50,
                out: str | Path | None = None, force: bool = False, progress: bool = True) -> BenchReport:
    """Time ``models`` (ONNX files, checkpoints, or ``nn.Module`` objects) side by side.

    With ``out``, bench.md, bench.json and bench.png (p50 latency vs batch) are written there; an
    existing file there is refused before anything is timed unless ``force``.
    """
    from slimkit.deploy.export import parse_input_shape

    t0 = time.perf_counter()
    batches = parse_batches(batch)
    shape = parse_input_shape(input_shape) if input_shape is not None else None
    paths = {}
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise SlimkitError(f"output {out} exists and is not a directory")
        if not out.parent.is_dir():
            raise SlimkitError(f"cannot create {out}: directory {out.parent} does not exist")
        files = tuple(str(m) for m in models if isinstance(m, (str, Path)))
        paths = {ext: out / f"bench.{ext}" for ext in ("md", "json", "png")}
        if out.is_dir():
            for p in paths.values():
                check_output(p, force, inputs=files)
    runners = [make_runner(m, provider, threads, shape, torch_fp16, channels_last, source, batches) for m in models]
    results = bench(runners, batches, warmup=warmup, runs=runs, threads=threads, progress=progress)
    report = BenchReport(results, time.perf_counter() - t0)
    if paths:
        out.mkdir(parents=True, exist_ok=True)
        text, payload = report.table() + "\n", json.dumps(report.to_json(), indent=2) + "\n"
        atomic_write(paths["md"], lambda tmp: tmp.write_text(text), force=force)
        atomic_write(paths["json"], lambda tmp: tmp.write_text(payload), force=force)
        plot(results, paths["png"], title=f"p50 latency, {results[0].provider}", force=force)
    return report
