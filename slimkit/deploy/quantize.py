"""INT8 export: ONNX Runtime's own static quantization (QDQ, per-channel weights), calibrated on the
user's images and verified by accuracy in ONNX Runtime, never elementwise.

The settings follow ONNX Runtime's quantization guide for the CPU this runs on (read from
/proc/cpuinfo). onnx and onnxruntime are imported inside the functions that use them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from slimkit.core.errors import SlimkitError, one_line

__all__ = ["Int8Settings", "Calibration", "Int8Request", "Int8Result", "MIN_CALIB", "DEFAULT_CALIB_SIZE",
           "cpu_flags", "choose_int8_settings", "check_int8_provider", "calibration_inputs", "int8_request",
           "quantize_model", "ort_logits", "ort_accuracy", "to_int8"]

# MinMax calibration sets each activation's range from the extremes of the images it sees, so a
# handful of images sets ranges a held-out image can exceed (clipped). 16 is a floor against
# accidental tiny sets (a near-empty folder, a mistyped --calib-size), not a measured cliff: on the
# bundled digits network even 2 images gave the fp32 accuracy (benchmarks/results/int8_digits.md).
# It is one image per class for up to 16 classes; ORT's CNN examples calibrate on hundreds.
MIN_CALIB = 16
DEFAULT_CALIB_SIZE = 256  # ORT's CNN examples calibrate on a few hundred images; more costs time, not accuracy
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # /proc/cpuinfo: 8-bit dot products without saturation


@dataclasses.dataclass
class Int8Settings:
    """How the file is quantized, and why (recorded in the report and the ONNX metadata)."""

    activations: str  # "uint8" (asymmetric) | "int8"
    weights: str = "int8"  # symmetric
    per_channel: bool = True  # one weight scale per output channel
    reduce_range: bool = False  # 7-bit weights
    format: str = "QDQ"  # QuantizeLinear/DequantizeLinear pairs; ORT's CPU provider fuses them into int8 kernels
    calibration: str = "minmax"
    cpu: str = ""  # the machine and the int8 flags it reported
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def short(self) -> str:
        a = "U8" if self.activations == "uint8" else "S8"
        return (f"{self.format} {a}S8 ({self.activations} activations, {self.weights} "
                f"{'per-channel' if self.per_channel else 'per-tensor'} weights), reduce_range "
                f"{self.reduce_range}, {self.calibration} calibration")


def cpu_flags() -> tuple[str, list[str]]:
    """The machine (x86_64, aarch64, ...) and which of its CPU flags matter for int8 kernels."""
    machine = platform.machine().lower()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return machine, []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return machine, sorted(f for f in flags if f in (*VNNI_FLAGS, "avx512f", "avx2", "asimddp", "i8mm"))


def choose_int8_settings(machine: str, flags: Iterable[str]) -> Int8Settings:
    """ONNX Runtime's documented choice for this CPU.

    ORT's guide: on x86-64 with AVX2/AVX-512 but no VNNI its U8S8 kernels use VPMADDUBSW, whose 16-bit
    intermediate sums can saturate: use reduce_range (7-bit weights); x64 with VNNI and ARM have no
    such issue. On x86 ORT's int8 kernels take unsigned activations and signed weights (U8S8; VNNI's
    VPDPBUSD is u8 x s8); an S8S8 QDQ file measured 1.2-2.8x slower than U8S8 on this project's Xeon
    (onnxruntime 1.31, benchmarks/results/int8_settings.md). Elsewhere S8S8 QDQ, ORT's default.
    """
    flags = set(flags)
    vnni = sorted(flags & set(VNNI_FLAGS))
    x86 = machine in ("x86_64", "amd64", "i386", "i686", "x86")
    cpu = f"{machine}; {', '.join(sorted(flags)) or 'no int8 flags found'}"
    if x86 and vnni:
        return Int8Settings("uint8", cpu=cpu, why=(
            f"x86-64 with VNNI ({', '.join(vnni)}): U8S8 runs on VNNI's u8 x s8 dot products without "
            "saturation (ONNX Runtime's quantization guide), so full 8-bit weights (no reduce_range)"))
    if x86:
        return Int8Settings("uint8", reduce_range=True, cpu=cpu, why=(
            "x86-64 without VNNI: ONNX Runtime's U8S8 kernels use VPMADDUBSW, whose 16-bit sums can "
            "saturate; its guide advises reduce_range (7-bit weights)"))
    return Int8Settings("int8", cpu=cpu, why=(
        f"{machine}: S8S8 QDQ, ONNX Runtime's default and first choice; the saturation issue is x86-only"))


def check_int8_provider(provider: str) -> None:
    """INT8 files are tuned for, and verified on, ONNX Runtime's CPU provider; refuse the others."""
    if provider == "cpu":
        return
    if provider == "torch":
        raise SlimkitError("provider torch cannot run an INT8 file: INT8 is an ONNX QDQ file for ONNX Runtime; "
                           "use --provider cpu")
    if provider in ("cuda", "tensorrt"):
        raise SlimkitError(f"INT8 for provider {provider} is not supported: its int8 kernels need symmetric signed "
                           "activations (and TensorRT its own calibration table), which slimkit neither builds nor "
                           "can verify here; INT8 files are made and checked for --provider cpu")
    raise SlimkitError(f"unknown provider {provider!r} for INT8; INT8 files run on: cpu")


@dataclasses.dataclass
class Calibration:
    x: np.ndarray  # (N, C, H, W) float32, preprocessed as the network expects
    source: str  # what --calib named
    split: str | None  # the split the images came from (None: a .npy array)
    requested: int  # --calib-size
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "split": self.split, "images": len(self.x), "requested": self.requested,
                "seed": self.seed}


def _calib_array(path: Path, input_shape: Sequence[int]) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SlimkitError(f"calibration file {path} is not a readable .npy array: {one_line(exc, 120)}") from exc
    want = "(N, " + ", ".join(map(str, input_shape)) + ")"
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_shape):
        raise SlimkitError(f"calibration array {path} has shape {tuple(x.shape)}; this network reads {want} "
                           "(images preprocessed as for the network: channels, height, width)")
    if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
        raise SlimkitError(f"calibration array {path} must hold finite floating-point values, got dtype {x.dtype}")
    return x.astype(np.float32)


def calibration_inputs(calib: str, input_shape: Sequence[int], meta: dict | None = None,
                       num_classes: int | None = None, size: int = DEFAULT_CALIB_SIZE, seed: int = 0) -> Calibration:
    """``size`` calibration images (a seeded selection) from ``calib``: 'digits', an ImageFolder or KE
    lists directory (its training split when it has one, else its val/test split), or a .npy array of
    preprocessed inputs (N, C, H, W). Images are preprocessed as the checkpoint's ``meta`` records."""
    if int(size) < MIN_CALIB:
        raise SlimkitError(f"--calib-size must be at least {MIN_CALIB} images, got {size}: fewer calibration "
                           "images give activation ranges that clip held-out images")
    shape = tuple(int(d) for d in input_shape)
    if calib.endswith(".npy"):
        path = Path(calib)
        if not path.is_file():
            raise SlimkitError(f"no such calibration file: {calib}")
        x = _calib_array(path, shape)
        if len(x) > size:
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size].numpy()]
        split = None
    else:
        from slimkit.data.images import eval_dataset, has_split

        split = "train" if calib == "digits" or has_split(calib, "train") else "test"
        # checks channels and class count; only the selected images are decoded
        ds = eval_dataset(calib, shape, meta, num_classes, split=split, subset=size, seed=seed)
        x = torch.cat([b for b, _ in torch.utils.data.DataLoader(ds, batch_size=256)]).numpy().astype(np.float32)
        if tuple(x.shape[1:]) != shape:  # an image set whose preprocessing does not give the network's input
            raise SlimkitError(f"calibration images from {calib} come out as {tuple(x.shape[1:])}; this network "
                               f"reads {shape}")
    if len(x) < MIN_CALIB:
        raise SlimkitError(f"calibration set {calib} has {len(x)} images; at least {MIN_CALIB} are needed for "
                           "activation ranges that do not clip held-out images")
    return Calibration(x, calib, split, int(size), seed)


@dataclasses.dataclass
class Int8Request:
    """Everything an INT8 export needs, loaded and checked before any heavy work."""

    calibration: Calibration
    settings: Int8Settings
    data: str | None = None  # held-out images for the accuracy check
    eval_set: Any = None
    max_drop: float = 1.0  # accuracy points


def int8_request(calib: str | None, input_shape: Sequence[int], meta: dict | None = None,
                 num_classes: int | None = None, calib_size: int = DEFAULT_CALIB_SIZE, seed: int = 0,
                 data: str | None = None, max_drop: float = 1.0, provider: str = "cpu",
                 opset: int = 17) -> Int8Request:
    """Check an INT8 request and load its calibration and held-out images (refusals come before export)."""
    import math

    check_int8_provider(provider)
    if calib is None:
        raise SlimkitError("--int8 needs --calib DATA: calibration images ('digits', an image directory or a "
                           ".npy array of preprocessed inputs) that set the activation ranges")
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and max_drop >= 0):
        raise SlimkitError(f"--max-drop must be a non-negative number of accuracy points, got {max_drop!r}")
    if int(opset) < 13:
        raise SlimkitError(f"--int8 needs --opset 13 or later (per-channel QuantizeLinear), got {opset}")
    cal = calibration_inputs(calib, input_shape, meta, num_classes, calib_size, seed)
    eval_set = None
    if data is not None:
        from slimkit.data.images import eval_dataset

        eval_set = eval_dataset(data, tuple(input_shape), meta, num_classes)
    return Int8Request(cal, choose_int8_settings(*cpu_flags()), data, eval_set, float(max_drop))


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ORT's quantization tools log advice on the root logger; keep it off the one-line contract."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def quantize_model(fp32: bytes, calib_x: np.ndarray, settings: Int8Settings, batch: int = 16) -> bytes:
    """Static QDQ quantization of an fp32 ONNX model with ``onnxruntime.quantization``: shape inference
    and graph optimisation (``quant_pre_process``), then ``quantize_static`` calibrated on ``calib_x``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, x: np.ndarray):
            self.batches = iter([{"input": x[i:i + batch]} for i in range(0, len(x), batch)])

        def get_next(self):
            return next(self.batches, None)

    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer():
        src, pre, out = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(out), Reader(calib_x), quant_format=QuantFormat.QDQ, per_channel=settings.per_channel,
            reduce_range=settings.reduce_range, activation_type=qtype[settings.activations],
            weight_type=qtype[settings.weights], calibrate_method=CalibrationMethod.MinMax,
            # no CalibMaxIntermediateOutputs: in onnxruntime 1.31 it drops every full group of batches
            # uncounted ("No data is collected" when the batches divide evenly). The calibration graph
            # keeps one ReduceMin/ReduceMax per tensor and batch, so memory stays small without it.
        )
        proto = onnx.load(str(out))
    return proto.SerializeToString()


def _session(data: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def ort_logits(data: bytes, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Logits of an ONNX model (bytes) in ONNX Runtime's CPU provider, ``batch`` images at a time."""
    sess = _session(data)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def ort_accuracy(data: bytes, dataset) -> float:
    """Top-1 accuracy of an ONNX model (bytes) on ``dataset`` in ONNX Runtime's CPU provider."""
    sess = _session(data)
    name = sess.get_inputs()[0].name
    correct = total = 0
    dtype = np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=64):
        pred = sess.run(None, {name: x.numpy().astype(dtype)})[0].argmax(1)
        correct += int((torch.from_numpy(pred) == y).sum())
        total += len(y)
    return correct / max(total, 1)


@dataclasses.dataclass
class Int8Result:
    data: bytes
    settings: dict[str, Any]
    calibration: dict[str, Any]
    agreement: float  # top-1 agreement with the fp32 file on the calibration images
    data_name: str | None = None
    n: int | None = None
    fp32_accuracy: float | None = None
    int8_accuracy: float | None = None
    drop_points: float | None = None  # fp32 - int8, in accuracy points
    max_drop: float | None = None

    def check(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("data", "settings", "calibration")}

    def lines(self) -> list[str]:
        out = [f"INT8: {self.settings['format']} {self.settings['activations']} activations / {self.settings['weights']} "
               f"per-channel weights, reduce_range {self.settings['reduce_range']}: {self.settings['why']}",
               f"calibrated on {self.calibration['images']} images of {self.calibration['source']}"
               + (f" ({self.calibration['split']} split)" if self.calibration["split"] else "")
               + f"; top-1 agreement with fp32 on them {100 * self.agreement:.1f}%"]
        if self.int8_accuracy is None:
            out.append("accuracy was not checked (no --data): give --data with held-out images to verify INT8")
        else:
            out.append(f"accuracy on {self.data_name} (n={self.n}, ONNX Runtime CPU): fp32 {100 * self.fp32_accuracy:.2f}%, "
                       f"INT8 {100 * self.int8_accuracy:.2f}% (drop {self.drop_points:+.2f} points, allowed {self.max_drop:g})")
            if self.calibration["split"] == "test" and self.calibration["source"] == self.data_name:
                out.append(f"note: {self.data_name} has no training split, so the calibration images are among the "
                           "accuracy images; calibrate on other images for an independent check")
        return out


def to_int8(fp32: bytes, req: Int8Request, meta: dict[str, str] | None = None, refuse: bool = True) -> Int8Result:
    """Quantize the verified fp32 file ``fp32`` as ``req`` says and check it by accuracy.

    Refused (SlimkitError) when the INT8 output is not finite, or, with ``refuse`` and held-out data,
    when its accuracy falls more than ``req.max_drop`` points below the fp32 file's. ``meta`` (the
    fp32 file's metadata) is written into the INT8 file with the settings, calibration and check.
    """
    import onnx

    try:
        data = quantize_model(fp32, req.calibration.x, req.settings)
    except Exception as exc:
        raise SlimkitError(f"ONNX Runtime's quantize_static failed: {one_line(exc, 200)}") from exc
    ref = ort_logits(fp32, req.calibration.x)
    got = ort_logits(data, req.calibration.x)
    if not np.isfinite(got).all():
        raise SlimkitError(f"the INT8 file gives {int((~np.isfinite(got)).sum())} inf/NaN logits on the "
                           "calibration images; nothing written")
    res = Int8Result(data, req.settings.to_json(), req.calibration.to_json(),
                     float((got.argmax(1) == ref.argmax(1)).mean()))
    if req.eval_set is not None:
        res.data_name, res.n, res.max_drop = req.data, len(req.eval_set), req.max_drop
        res.fp32_accuracy, res.int8_accuracy = ort_accuracy(fp32, req.eval_set), ort_accuracy(data, req.eval_set)
        res.drop_points = 100 * (res.fp32_accuracy - res.int8_accuracy)
        if refuse and res.drop_points > req.max_drop:
            raise SlimkitError(
                f"INT8 accuracy on {req.data} (n={res.n}) is {100 * res.int8_accuracy:.2f}% against fp32 "
                f"{100 * res.fp32_accuracy:.2f}%: a drop of {res.drop_points:.2f} points > --max-drop {req.max_drop:g}; "
                "nothing written")
    proto = onnx.load_from_string(data)
    props = dict(meta or {})
    props.update({"slimkit.precision": "int8", "slimkit.int8": json.dumps(res.settings),
                  "slimkit.int8_calibration": json.dumps(res.calibration), "slimkit.int8_check": json.dumps(res.check())})
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "slimkit"
    res.data = proto.SerializeToString()
    return res
