"""Self-describing, safe-loading checkpoints.

A slimkit checkpoint is a ``torch.save`` of plain containers and tensors only::

    {"format": "slimkit", "format_version": 1,
     "spec":  {"arch", "args", "input_shape"},     # how to rebuild the dense network
     "plans": [KeepPlan.to_json(), ...],           # cuts applied to it, oldest first ([] = dense)
     "concat": 2,                                  # only for a merged big student (methods/merge): widened first (core/widen.py)
     "meta":  {"split": ..., "provenance": ..., ...},
     "state_dict": {...}}

so a sliced network loads without its parent: rebuild the dense network by name, re-apply the
recorded plans through the same surgery, load the weights. Loading always uses
``torch.load(weights_only=True)``; nothing in a file is ever executed.

:func:`read` also accepts, given an arch, a plain state_dict, a training checkpoint holding one
(timm, torchvision reference scripts, PyTorch Lightning; keys possibly prefixed ``module.``,
``model.``, ...), a safetensors file, and checkpoints of the official Knowledge Evolution code
(``{"arch": "Split_ResNet18", "state_dict": ...}`` whose conv/linear entries carry ``*.mask``).
Which bytes are which and where the weights sit inside is :mod:`slimkit.core.formats`.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import SlimkitError, one_line
from slimkit.core.fileio import atomic_write, sha256_of
from slimkit.core.formats import choose_weights, fit_prefix, load_file
from slimkit.core.graph import ChannelGraph, prunable_layers
from slimkit.core.plan import KeepPlan
from slimkit.core.surgery import cut, plans_of
from slimkit.core.widen import widen
from slimkit.models.registry import (
    ModelSpec,
    create_model,
    is_import_path,
    list_models,
    model_params,
    spec_of,
)

__all__ = ["Loaded", "save", "load", "read", "from_module", "source", "state_dict_bytes"]

FORMAT = "slimkit"
FORMAT_VERSION = 1


@dataclasses.dataclass
class Loaded:
    """A network read from a file, with what the file said about it."""

    model: nn.Module
    kind: str  # "slimkit" | "state_dict" | "ke" (official Knowledge Evolution code) | "module" (an object)
    path: Path | None  # None for a network given as an object (from_module)
    sha256: str
    nbytes: int
    meta: dict[str, Any]
    masks: dict[str, torch.Tensor] | None = None  # split masks stored in the file (KE checkpoints)


def _version() -> str:
    from slimkit import __version__

    return __version__


def _payload(model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    spec = spec_of(model)
    try:
        json.dumps(meta)
    except TypeError as exc:
        raise SlimkitError(f"checkpoint metadata must be JSON-serialisable: {exc}") from exc
    meta = dict(meta)
    prov = dict(meta.pop("provenance", {}) or {})
    prov.setdefault("slimkit_version", _version())
    prov.setdefault("torch_version", str(torch.__version__))
    prov.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    meta["provenance"] = prov
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": spec.to_json(),
        "plans": [p.to_json() for p in plans_of(model)],
        "meta": meta,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    if getattr(model, "slimkit_concat", 1) != 1:
        payload["concat"] = int(model.slimkit_concat)
    return payload


def save(model: nn.Module, path: str | Path, force: bool = False, **meta: Any) -> Path:
    """Write ``model`` (created by slimkit, dense or cut) atomically; never overwrites unless ``force``.

    ``meta`` (JSON-serialisable) is stored beside the weights: e.g. ``split={"mode": "kels",
    "rate": 0.5}``, ``classes=[...]``, ``provenance={"source_sha256": ...}``.
    """
    payload = _payload(model, meta)
    return atomic_write(path, lambda tmp: torch.save(payload, tmp), force=force)


def state_dict_bytes(model: nn.Module, **meta: Any) -> int:
    """Size in bytes the slimkit checkpoint of ``model`` has (serialised in memory, nothing written)."""
    buf = io.BytesIO()
    torch.save(_payload(model, meta), buf)
    return buf.tell()


def load(path: str | Path, arch: str | None = None, num_classes: int | None = None,
         model_args: dict[str, Any] | None = None, plain_only: bool = False,
         input_shape: tuple[int, ...] | None = None, ema: bool = False, state_key: str | None = None) -> nn.Module:
    """The network in ``path`` in eval mode (see :func:`read` for the accepted formats)."""
    return read(path, arch=arch, num_classes=num_classes, model_args=model_args, plain_only=plain_only,
                input_shape=input_shape, ema=ema, state_key=state_key).model


# --- reading -------------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise SlimkitError(f"no such file: {path}")
    if path.is_dir():
        raise SlimkitError(f"{path} is a directory; give a checkpoint file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SlimkitError(f"cannot read {path}: {exc.strerror or one_line(exc)}") from exc
    if not data:
        raise SlimkitError(f"{path} is empty (0 bytes), not a checkpoint")
    return data


def _load_weights(path: Path, model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Strict load with a one-line account of what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or extra or bad:
        parts = []
        if bad:
            k = bad[0]
            parts.append(f"{len(bad)} shape mismatch(es), first {k}: file {list(sd[k].shape)} vs model {list(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), first {missing[0]}")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s), first {extra[0]}")
        raise SlimkitError(f"{path} does not fit {what}: {'; '.join(parts)}; check --arch, --num-classes "
                           "and --model-args")
    if getattr(sd, "_metadata", None) is None:
        # no module versions in the file (safetensors, a plain dict): the weights are taken to be of the
        # architecture's current versions, as its own fresh state_dict says (torchvision's mnasnet needs one)
        sd = collections.OrderedDict(sd)
        sd._metadata = own._metadata
    model.load_state_dict(sd, strict=True)


def _classifier_classes(probe: nn.Module, sd: dict[str, torch.Tensor]) -> int:
    """Infer the class count: the last conv/linear layer of the architecture (``probe``) is its classifier."""
    last = list(prunable_layers(probe))[-1]
    w = sd.get(last + ".weight")
    if w is None:
        raise SlimkitError(f"cannot infer the number of classes: no {last}.weight in the file; pass --num-classes")
    return int(w.shape[0])


def _ke_arch(name: str) -> str:
    arch = name.lower()
    arch = arch[len("split_"):] if arch.startswith("split_") else arch
    if arch not in list_models():
        raise SlimkitError(f"Knowledge Evolution arch {name!r} has no slimkit equivalent; available: {', '.join(list_models())}")
    return arch


def _check_user_arch(path: Path, file_arch: str, arch: str | None, file_classes: int, num_classes: int | None,
                     file_args: dict[str, Any] | None = None, model_args: dict[str, Any] | None = None) -> None:
    if arch is not None and arch != file_arch:
        raise SlimkitError(f"{path} holds a {file_arch} but --arch says {arch}; drop --arch or pick the right file")
    if num_classes is not None and num_classes != file_classes:
        raise SlimkitError(f"{path} has {file_classes} classes but --num-classes says {num_classes}")
    for k, v in (model_args or {}).items():
        if file_args is not None and file_args.get(k) != v:
            raise SlimkitError(f"{path} was built with {k}={file_args.get(k)!r} but --model-args says {k}={v!r}; "
                               "the file says how to build it, so drop --model-args")


def read(path: str | Path, arch: str | None = None, num_classes: int | None = None,
         model_args: dict[str, Any] | None = None, plain_only: bool = False,
         input_shape: tuple[int, ...] | None = None, ema: bool = False, state_key: str | None = None) -> Loaded:
    """Load any checkpoint slimkit understands into a fresh network in eval mode.

    ``arch``/``num_classes`` are needed only for plain state_dicts (classes are inferred from the
    classifier when omitted); for slimkit and KE checkpoints the file says them. ``model_args``
    are further constructor arguments of a plain state_dict's or KE file's network (e.g.
    ``{"depth": 56}`` for cifar_resnet); a slimkit checkpoint must agree with any given, unless
    ``plain_only`` says they are meant for plain state_dicts only (bench: one set of flags for
    several files), in which case self-describing files ignore them. ``input_shape`` (C, H, W) is the
    input of a plain state_dict's network when its source's default does not fit (a slimkit
    checkpoint records its own).

    A file with several weight sets (a training checkpoint with EMA weights) gives its live weights;
    ``ema`` asks for the EMA weights, ``state_key`` names an entry (a dotted path for nested ones).
    Either is an error for a slimkit checkpoint (one set of weights) unless ``plain_only``.

    A slimkit checkpoint whose source is an import path (``package.module:callable``) is rebuilt only
    when ``arch`` names that same path: loading a file never imports code the caller did not name.
    """
    # parameters built under a caller's inference_mode could never be traced or trained
    with torch.inference_mode(False):
        return _read(Path(path), arch, num_classes, dict(model_args or {}), plain_only, input_shape, ema, state_key)



def from_module(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> Loaded:
    """A network given as an object, as :func:`read` would give a file: an eval-mode copy (the caller's
    module is not touched) with the sha256 of its state. A module slimkit did not create has no
    ModelSpec; it needs ``input_shape`` (C, H, W), and is named by its class."""
    import copy

    if not isinstance(model, nn.Module):
        raise SlimkitError(f"expected a path or a torch.nn.Module, got {type(model).__name__}")
    m = copy.deepcopy(model).eval()
    spec = getattr(m, "slimkit_spec", None)
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        cls = type(model)
        m.slimkit_spec = (dataclasses.replace(spec, input_shape=shape) if spec is not None else
                          ModelSpec(arch=f"{cls.__module__}:{cls.__qualname__}", args={}, input_shape=shape))
    elif spec is None:
        raise SlimkitError(f"this {type(model).__name__} was not built by slimkit.create_model, so its input shape "
                           "is unknown; pass input_shape=(C, H, W)")
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in m.state_dict().items()}, buf)
    data = buf.getvalue()
    return Loaded(model=m, kind="module", path=None, sha256=sha256_of(data), nbytes=len(data), meta={})


def source(obj: str | Path | nn.Module, input_shape: tuple[int, ...] | None = None, **read_kwargs: Any) -> Loaded:
    """What every verb reads: a file (see :func:`read`) or a network object (see :func:`from_module`)."""
    if isinstance(obj, nn.Module):
        return from_module(obj, input_shape)
    return read(obj, input_shape=input_shape, **read_kwargs)

def _read(path: Path, arch: str | None, num_classes: int | None, model_args: dict[str, Any],
          plain_only: bool = False, input_shape: tuple[int, ...] | None = None, ema: bool = False,
          state_key: str | None = None) -> Loaded:
    if "num_classes" in model_args:
        raise SlimkitError("give the class count with --num-classes, not --model-args")
    data = _read_bytes(path)
    sha, nbytes = sha256_of(data), len(data)
    obj = load_file(path, data)

    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if (ema or state_key is not None) and not plain_only:
            raise SlimkitError(f"{path} is a slimkit checkpoint, which holds one set of weights; drop "
                               f"{'--ema' if ema else '--state-key'}")
        return _read_slimkit(path, obj, arch, num_classes, model_args, plain_only, sha, nbytes)

    file_arch = obj.get("arch") if isinstance(obj, dict) and isinstance(obj.get("arch"), str) else None
    key, sd = choose_weights(path, obj, ema, state_key)
    meta: dict[str, Any] = {"weights": key} if key else {}
    masks = [k for k in sd if k.endswith(".mask")]
    if masks:  # official Knowledge Evolution checkpoint: SplitConv/SplitLinear keep their masks
        if file_arch is None and arch is None:
            raise SlimkitError(f"{path} carries split masks but no arch; pass --arch")
        resolved = _ke_arch(file_arch) if file_arch else arch
    elif arch is None:
        raise SlimkitError(
            f"{path} is a plain state_dict, which does not say its architecture; pass --arch "
            f"(one of: {', '.join(list_models())}) and --num-classes"
        )
    else:
        resolved = arch
    probe = create_model(resolved, **model_args)  # its keys say which key prefix fits, its classifier the classes
    built_probe = ", ".join(f"{k}={v!r}" for k, v in model_args.items())
    sd = fit_prefix(path, sd, set(probe.state_dict()), f"{resolved}({built_probe})", ignore=(".mask",))
    masks = {k[: -len(".mask")]: v for k, v in sd.items() if k.endswith(".mask")}
    if masks:
        weights = collections.OrderedDict((k, v) for k, v in sd.items() if not k.endswith(".mask"))
        if getattr(sd, "_metadata", None) is not None:
            weights._metadata = sd._metadata
        sd = weights
        classes = _classifier_classes(probe, sd)
        if not plain_only:
            _check_user_arch(path, resolved, arch, classes, num_classes)
        kind, arch, num_classes = "ke", resolved, classes
        meta["source_arch"] = file_arch or arch
    else:
        if num_classes is None and "num_classes" in model_params(arch):
            num_classes = _classifier_classes(probe, sd)
        kind = "state_dict"
    takes_classes = "num_classes" in model_params(arch)
    classes = {"num_classes": num_classes} if takes_classes else {}
    model = create_model(arch, input_shape=input_shape, **classes, **model_args)
    built = ", ".join(f"{k}={v!r}" for k, v in {**classes, **model_args}.items())
    _load_weights(path, model, sd, f"{arch}({built})")
    if masks:
        layers = prunable_layers(model)
        unknown = sorted(set(masks) - set(layers))
        if unknown:
            raise SlimkitError(f"{path} has a split mask {unknown[0]}.mask for a layer {arch} does not have as conv/linear")
        masks = {k: v.ne(0) for k, v in masks.items()}
    return Loaded(model.eval(), kind, path, sha, nbytes, meta, masks or None)


def _read_slimkit(path: Path, obj: dict[str, Any], arch: str | None, num_classes: int | None,
                  model_args: dict[str, Any], plain_only: bool, sha: str, nbytes: int) -> Loaded:
    if obj.get("format_version") != FORMAT_VERSION:
        raise SlimkitError(f"{path} is slimkit checkpoint format {obj.get('format_version')}; this slimkit reads {FORMAT_VERSION}")
    try:
        spec = ModelSpec.from_json(obj["spec"])
        plans = [KeepPlan.from_json(p) for p in obj.get("plans", [])]
        meta = dict(obj.get("meta", {}))
        sd = obj["state_dict"]
        concat = int(obj.get("concat", 1))
    except (KeyError, TypeError, ValueError) as exc:
        raise SlimkitError(f"{path} is a damaged slimkit checkpoint: {one_line(exc)}") from exc
    if is_import_path(spec.arch) and arch != spec.arch:
        raise SlimkitError(f"{path} was built by the import path {spec.arch!r}; slimkit imports code only when "
                           f"you name it: pass --arch {spec.arch} to allow it")
    if not plain_only:
        _check_user_arch(path, spec.arch, arch, spec.args.get("num_classes"), num_classes, spec.args, model_args)
    model = create_model(spec.arch, input_shape=spec.input_shape, **spec.args)
    if concat == 2:  # a merged big student: two copies side by side (methods/merge)
        widen(model, spec.input_shape)
    elif concat != 1:
        raise SlimkitError(f"{path} describes a concatenation of {concat} networks; slimkit merges two")
    for plan in plans:  # re-cut the fresh dense network exactly as the parent was cut
        cut(ChannelGraph(model, spec.input_shape), plan)
    _load_weights(path, model, sd, f"the {spec.arch} it describes")
    return Loaded(model.eval(), "slimkit", path, sha, nbytes, meta)
