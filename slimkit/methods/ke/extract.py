"""`slimkit extract`: the fit hypothesis of a trained network as a physically smaller network, written.

The plan -> cut -> verify step itself is models/hypothesis.py's :func:`fit_hypothesis`, shared with `compare`."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from slimkit.core.cost import count_params
from slimkit.core.errors import SlimkitError
from slimkit.core.fileio import check_output
from slimkit.core.globalstate import keep_global_state
from slimkit.core.plan import check_split_rate
from slimkit.models.checkpoint import save, source, state_dict_bytes
from slimkit.models.hypothesis import fit_hypothesis
from slimkit.models.registry import run_at, spec_of

__all__ = ["ExtractReport", "extract", "default_output", "SPLIT_MODES"]

SPLIT_MODES = ("kels", "wels")


@dataclasses.dataclass
class ExtractReport:
    source: str
    output: str
    source_kind: str
    arch: str
    input_shape: list[int]
    split_mode: str
    split_rate: float | None
    dense: dict[str, int]  # params, macs, bytes
    slim: dict[str, int]
    max_abs_diff: float
    max_rel_diff: float
    verify_batch: int
    seconds: float
    verify_dtype: str = "float64"  # float32 only for a network without float64 kernels
    source_weights: str | None = None  # the entry of a training checkpoint the weights came from (e.g. state_dict_ema)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ratio"] = {k: self.slim[k] / self.dense[k] for k in self.dense}
        return d

    def table(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        rate = f", split rate {self.split_rate:g}" if self.split_rate is not None else ""
        weights = f", weights {self.source_weights}" if self.source_weights else ""
        rows = [
            ("parameters", f"{self.dense['params']:,}", f"{self.slim['params']:,}", self.slim["params"] / self.dense["params"]),
            (f"MACs @ {shape}", _si(self.dense["macs"]), _si(self.slim["macs"]), self.slim["macs"] / self.dense["macs"]),
            ("checkpoint size", _mb(self.dense["bytes"]), _mb(self.slim["bytes"]), self.slim["bytes"] / self.dense["bytes"]),
        ]
        w0 = max(len(r[0]) for r in rows)
        lines = [
            f"{self.arch} ({self.source_kind} checkpoint {self.source}{weights}): {self.split_mode.upper()} fit "
            f"hypothesis{rate}",
            f"{'':{w0}}  {'dense':>14}  {'slim':>14}  {'slim/dense':>10}",
        ]
        lines += [f"{a:{w0}}  {b:>14}  {c:>14}  {r:>10.3f}" for a, b, c, r in rows]
        lines.append(
            f"verified: max |slim(x) - masked_dense(x)| = {self.max_abs_diff:.2e} "
            f"(relative {self.max_rel_diff:.1e}) on {self.verify_batch} random inputs, in {self.verify_dtype}"
        )
        lines.append(f"wrote {self.output} in {self.seconds:.1f} s")
        return "\n".join(lines)


def _si(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def default_output(ckpt: Path) -> Path:
    """``ckpt.pt`` -> ``ckpt.slim.pt`` beside it."""
    name = ckpt.name
    for suffix in (".pth.tar", ".pt", ".pth", ".tar", ".ckpt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return ckpt.with_name(name + ".slim.pt")


def _name(obj: Any) -> str:
    """How a report names what it read: the path, or the class of a network object."""
    return f"<{type(obj).__name__} object>" if isinstance(obj, torch.nn.Module) else str(obj)


def _check_split_mode(split_mode: str) -> None:
    if split_mode not in SPLIT_MODES:
        raise SlimkitError(f"unknown split mode {split_mode!r}; available: {', '.join(SPLIT_MODES)}")
    if split_mode == "wels":
        raise SlimkitError(
            "WELS has no slim network: its fit hypothesis is a random scatter of single weights, so no "
            "filter or channel can be removed; use --split-mode kels"
        )


@keep_global_state()  # rebuilding a network draws its throw-away init from the global generator
def extract(
    ckpt: str | Path | torch.nn.Module,
    split_rate: float | None = None,
    split_mode: str = "kels",
    arch: str | None = None,
    num_classes: int | None = None,
    model_args: dict[str, Any] | None = None,
    out: str | Path | None = None,
    force: bool = False,
    seed: int = 0,
    verify_batch: int = 2,
    input_shape: tuple[int, ...] | None = None,
    ema: bool = False,
    state_key: str | None = None,
) -> ExtractReport:
    """Cut the KELS fit hypothesis out of ``ckpt``, verify it, write it, and report dense vs slim.

    For an official Knowledge Evolution checkpoint the masks in the file define the split and
    ``split_rate`` may be omitted (when given, it must agree with them). ``input_shape`` (C, H, W)
    is the input the network is verified at and the slim checkpoint records (default: a slimkit
    checkpoint's own, else the model source's, e.g. a timm model's config).
    ``ema`` takes a training checkpoint's EMA weights, ``state_key`` names the entry holding the weights.
    """
    t0 = time.perf_counter()
    is_object = isinstance(ckpt, torch.nn.Module)
    _check_split_mode(split_mode)
    if split_rate is not None:
        check_split_rate(split_rate)  # a bad rate is reported before anything is read
    if is_object:
        if out is None:
            raise SlimkitError("extract of a network object needs out=PATH (there is no file to write beside)")
        if getattr(ckpt, "slimkit_spec", None) is None:
            raise SlimkitError(f"this {type(ckpt).__name__} was not built by slimkit.create_model: a slim checkpoint "
                               "must say how to rebuild its network; build it with create_model (your own class as "
                               "package.module:callable, or register_model)")
    else:
        ckpt = Path(ckpt)
        if not ckpt.exists():
            raise SlimkitError(f"no such file: {ckpt}")
    out = Path(out) if out is not None else default_output(ckpt)
    check_output(out, force, inputs=() if is_object else (ckpt,))

    src = source(ckpt, arch=arch, num_classes=num_classes, model_args=model_args, input_shape=input_shape,
                 **({} if is_object else {"ema": ema, "state_key": state_key}))
    run_at(src.model, input_shape)  # a slimkit checkpoint is run at the given input too
    fh = fit_hypothesis(src, split_rate, seed=seed, verify_batch=verify_batch)
    dense, slim, spec, sr = fh.dense, fh.slim, spec_of(src.model), fh.split_rate
    max_abs, max_rel = fh.max_abs_diff, fh.max_rel_diff
    meta = {
        "split": {"mode": "kels", "rate": sr, **({"round_to": fh.round_to} if fh.round_to > 1 else {})},
        "provenance": {"source": _name(ckpt), "source_sha256": src.sha256, "source_kind": src.kind,
                       **({"source_weights": src.meta["weights"]} if src.meta.get("weights") else {})},
        "verified": {"max_abs_diff": max_abs, "max_rel_diff": max_rel, "batch": verify_batch, "seed": seed,
                     "dtype": fh.verify_dtype},
    }
    if "classes" in src.meta:
        meta["classes"] = src.meta["classes"]
    save(slim, out, force=force, **meta)
    return ExtractReport(
        source=_name(ckpt), output=str(out), source_kind=src.kind, arch=spec.arch,
        input_shape=list(spec.input_shape), split_mode="kels", split_rate=sr,
        dense={"params": count_params(dense), "macs": fh.dense_macs, "bytes": state_dict_bytes(dense)},
        slim={"params": count_params(slim), "macs": fh.slim_macs, "bytes": out.stat().st_size},
        max_abs_diff=max_abs, max_rel_diff=max_rel, verify_batch=verify_batch,
        seconds=time.perf_counter() - t0, verify_dtype=fh.verify_dtype, source_weights=src.meta.get("weights"),
    )
