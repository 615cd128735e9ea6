"""The files users have: which bytes they are, and where the weights are inside them.

slimkit reads two containers, told apart by their content (not their name):

- **safetensors**: 8 bytes little-endian header length, a JSON header, raw tensor data. Read with
  the ``safetensors`` package; it holds tensors only, so nothing in it can run.
- **torch.save** pickles (zip or legacy format), read with ``torch.load(weights_only=True)``. Beside
  tensors and plain containers, only the plain types training tools store next to the weights are
  allowed (:data:`PLAIN_TYPES`: ``argparse.Namespace`` of timm's and torchvision's ``args``,
  ``pathlib`` paths), and only for the duration of the load; a pickle naming anything else is
  refused, never imported or run.

Inside a loaded object, a *weight set* is a dict of named tensors. Training tools nest them:
timm's train.py (``state_dict``, ``state_dict_ema``, ``optimizer``, ``args``, ...), torchvision's
reference scripts (``model``, ``model_ema`` of an ``AveragedModel``: keys ``module.*`` plus
``n_averaged``), PyTorch Lightning (``state_dict`` with keys ``model.*``/``net.*``, EMA callbacks'
state under ``callbacks``). :func:`choose_weights` finds every weight set, picks the live one, the
EMA one (``ema=True``) or a named one, and :func:`fit_prefix` strips a key prefix shared by all
weights when, and only when, the stripped keys are the architecture's.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import pathlib
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from slimkit.core.errors import SlimkitError, one_line

__all__ = ["PLAIN_TYPES", "load_file", "weight_sets", "choose_weights", "fit_prefix", "is_ema_key"]

# plain types that training tools store beside the weights; their constructors run no user code
PLAIN_TYPES = (argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.PureWindowsPath)
# entries that hold training state, never a network's weights: not searched for weight sets
_NOT_WEIGHTS = re.compile(r"optim|sched|scaler|loops|grad_scaler", re.IGNORECASE)
# tensors that sit among weights without being any (torch.optim.swa_utils.AveragedModel's counter)
_COUNTERS = ("n_averaged",)
_MAX_DEPTH = 4  # how deep nested dicts are searched for weight sets


def _safe_globals() -> list:
    out: list = []
    for cls in PLAIN_TYPES:
        out.append(cls)
        if cls.__module__ == "pathlib":  # Python 3.13 pickles pathlib classes as pathlib._local.*
            out.append((cls, f"pathlib._local.{cls.__qualname__}"))
    return out


def load_file(path: Path, data: bytes) -> Any:
    """The object stored in ``data`` (the bytes of ``path``): safetensors or a torch.save pickle."""
    if _looks_safetensors(data):
        return _safetensors_load(path, data)
    if path.suffix == ".safetensors" and not data.startswith((b"PK\x03\x04", b"\x80")):  # not torch.save's zip/pickle
        n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
        raise SlimkitError(f"{path} has a corrupt safetensors header: its first 8 bytes give a header of {n} bytes "
                           f"in a file of {len(data)}, which does not start a JSON object")
    return _torch_load(path, data)


def _looks_safetensors(data: bytes) -> bool:
    """8-byte little-endian header length, then a JSON object: no torch.save file starts so (zip: 'PK')."""
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def _safetensors_load(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise SlimkitError(f"{path} has a corrupt safetensors header ({n} bytes of JSON expected): "
                           f"{one_line(exc, 120)}") from exc
    try:
        from safetensors.torch import load
    except ImportError as exc:  # a dependency of slimkit; only a broken install lacks it
        raise SlimkitError(f"{path} is a safetensors file; install the safetensors package to read it") from exc
    try:
        return dict(load(data))
    except Exception as exc:  # safetensors' own SafetensorError on offsets and dtypes that do not fit
        raise SlimkitError(f"{path} is a damaged safetensors file: {one_line(exc, 160)}") from exc


def _torch_load(path: Path, data: bytes) -> Any:
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols: our error says it better
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(_safe_globals()):  # allowed for this load only
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).split("\n")
        why = next((ln.strip() for ln in lines if "GLOBAL" in ln.upper() and "unsupported" in ln.lower()), None)
        if why is not None:  # a real pickle naming a class or function: refuse, never import it
            why = why.split(" was not an allowed global")[0].rstrip(".")
            raise SlimkitError(
                f"{path} contains Python objects other than tensors, plain containers, argparse.Namespace and "
                "pathlib paths; slimkit loads weights only and never executes "
                f"code from a file ({why}). Re-save just the state_dict: torch.save(model.state_dict(), path)"
            ) from exc
        raise SlimkitError(f"{path} is not a PyTorch checkpoint (corrupt or truncated?): {one_line(exc, 120)}") from exc
    except Exception as exc:  # torch raises RuntimeError/EOFError/ValueError/... on damaged files
        raise SlimkitError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {one_line(exc, 120)}") from exc


# --- where the weights are ------------------------------------------------------------------------

def _is_weight_set(obj: Any) -> bool:
    """A dict of named tensors, at least one of them a floating-point array (not a scalar counter)."""
    return (isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values())
            and any(v.is_floating_point() and v.dim() > 0 for v in obj.values()))


def weight_sets(obj: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Every weight set in ``obj`` by its dotted path ("" when ``obj`` is one), optimizer state aside."""
    if _is_weight_set(obj):
        return {"": obj}
    return dict(_walk(obj, "", 0))


def _walk(obj: Any, prefix: str, depth: int) -> Iterator[tuple[str, dict]]:
    if not isinstance(obj, dict) or depth >= _MAX_DEPTH or not all(isinstance(k, str) for k in obj):
        return
    for key, value in obj.items():
        if _NOT_WEIGHTS.search(key):
            continue
        path = f"{prefix}{key}"
        if _is_weight_set(value):
            yield path, value
        else:
            yield from _walk(value, path + ".", depth + 1)


def is_ema_key(key: str) -> bool:
    """An entry holding EMA weights: 'ema' as a word of its path (state_dict_ema, model_ema, ema, ...)."""
    return "ema" in re.split(r"[^a-z0-9]+", key.lower())


def _entry(obj: Any, key: str) -> Any:
    """``obj[key]``, where ``key`` may be a dotted path through nested dicts (exact keys tried first)."""
    if isinstance(obj, dict) and key in obj:
        return obj[key]
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the longest first component that is a key
        head = ".".join(parts[:i])
        if isinstance(obj, dict) and head in obj:
            return _entry(obj[head], ".".join(parts[i:]))
    raise KeyError(key)


def _keys(obj: Any) -> str:
    return ", ".join(map(str, list(obj)[:12])) + (", ..." if len(obj) > 12 else "") if isinstance(obj, dict) else ""


def choose_weights(path: Path, obj: Any, ema: bool = False, state_key: str | None = None
                   ) -> tuple[str, dict[str, torch.Tensor]]:
    """(dotted key, weight set) of the network in ``obj``: the one named by ``state_key``, the EMA one
    (``ema``), or else the only live (non-EMA) weight set. Refuses, listing the file's entries, when the
    choice is missing or ambiguous."""
    if ema and state_key is not None:
        raise SlimkitError("give --ema or --state-key, not both (--state-key names the entry, EMA or not)")
    sets = weight_sets(obj)
    entries = f"its entries: {_keys(obj)}" if isinstance(obj, dict) else f"it holds a {type(obj).__name__}"
    if state_key is not None:
        try:
            chosen = _entry(obj, state_key)
        except KeyError as exc:
            raise SlimkitError(f"{path} has no entry {state_key!r} ({entries}); weight sets found: "
                               f"{', '.join(sets) or 'none'}") from exc
        if not _is_weight_set(chosen):
            raise SlimkitError(f"entry {state_key!r} of {path} is not a set of weights (type "
                               f"{type(chosen).__name__}{', keys ' + _keys(chosen) if isinstance(chosen, dict) else ''}); "
                               f"weight sets found: {', '.join(sets) or 'none'}")
        return state_key, chosen
    if not sets:
        what = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else type(obj).__name__
        raise SlimkitError(f"{path} holds {what}, not a state_dict; expected a slimkit checkpoint, a state_dict, a "
                           "training checkpoint with one, or a safetensors file")
    if ema:
        found = [k for k in sets if is_ema_key(k)]
        if not found and "" in sets:
            raise SlimkitError(f"{path} is one plain set of weights ({len(obj)} tensors) with no EMA weights; drop --ema")
        if not found:
            raise SlimkitError(f"{path} has no EMA weights ({entries}; weight sets: {', '.join(sets)}); "
                               "drop --ema, or name the weights with --state-key KEY")
    else:
        found = [k for k in sets if not is_ema_key(k)] or list(sets)
    if len(found) > 1:
        raise SlimkitError(f"{path} holds {len(found)} candidate weight sets ({', '.join(found)}) and none is "
                           f"named; pick one with --state-key KEY, e.g. --state-key {found[0]}")
    return found[0], sets[found[0]]


def fit_prefix(path: Path, sd: dict[str, torch.Tensor], expected: set[str], what: str,
               ignore: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``sd`` with the key prefix shared by all its weights stripped, as far as makes its keys the
    architecture's ``expected`` keys (``module.``, ``_orig_mod.``, ``model.``, ``net.``, nested).

    Keys ending in ``ignore`` (e.g. ``.mask``) take part in the prefix but not in the comparison. A
    state_dict's per-module ``_metadata`` (versions) follows its keys. With no shared prefix ``sd``
    is returned as it is (a strict load reports what does not fit); a shared prefix that fits
    neither kept nor stripped is refused here.
    """
    keys = [k for k in sd if not (k in _COUNTERS and k not in expected)]
    parts = [k.split(".") for k in keys]
    shared = 0
    while all(len(p) > shared + 1 for p in parts) and len({p[shared] for p in parts}) == 1:
        shared += 1
    prefixes = ["".join(f"{c}." for c in parts[0][:i]) for i in range(shared + 1)]

    def stripped(prefix: str) -> set[str]:
        return {k[len(prefix):] for k in keys if not (ignore and k.endswith(ignore))}

    fit = next((p for p in prefixes if stripped(p) == expected), None)
    if fit is None:
        if shared == 0:
            return sd
        deep = prefixes[-1]
        missing = sorted(expected - stripped(deep))
        extra = sorted(stripped(deep) - expected)
        raise SlimkitError(
            f"{path}: every weight's key starts with {deep!r} but neither with it nor with any part of it "
            f"stripped do the keys fit {what} ({len(missing)} missing, first {missing[0] if missing else '-'}; "
            f"{len(extra)} unexpected, first {deep}{extra[0] if extra else '-'}); check --arch and --model-args, "
            "or name the weights with --state-key"
        )
    out = collections.OrderedDict((k[len(fit):], sd[k]) for k in keys)
    meta = getattr(sd, "_metadata", None)
    if meta is not None:  # module versions, keyed by module path: '' is the root
        root = fit[:-1]
        out._metadata = collections.OrderedDict(
            (("" if m == root else m[len(fit):]), v) for m, v in meta.items()
            if not fit or m == root or m.startswith(fit))
    return out
