"""The slim network of a source: its KELS fit hypothesis's architecture, freshly initialised.

The "scratch" route (Liu et al., "Rethinking the Value of Network Pruning", ICLR 2019) trains the
architecture a method ends in from a random init. Here that architecture is the one every route
ends in: the dense source cut to the KELS widths of a split rate by the one surgery, so the result
carries its ModelSpec and plan and saves, loads, exports and benchmarks exactly like an extracted
fit hypothesis.

Initialisation: the source's own. The dense source is built once while its initialisation calls are
recorded (``torch.nn.init`` functions and in-place ``normal_``/``uniform_``/``fill_``/``zero_`` on
parameters); after the cut every parameter's last recorded call is run again on the slim parameter,
drawing from the caller's ``torch.Generator``. A fan-dependent ``torch.nn.init`` function
(kaiming, xavier, orthogonal, ...) therefore scales to the *slim* layer's fan, as building the slim
architecture directly would; PyTorch's default conv/linear bias bound 1/sqrt(fan_in) is recognised
and recomputed from the slim fan. A bare ``w.normal_(0, std)`` whose std the source computed
itself is replayed with that std (the dense layer's fan), and a parameter whose last write was not
an init call (a ``copy_``) keeps the construction value, cut like any other. Cutting a dense init
instead would leave every layer initialised for the dense fan (a 0.5 split: weights too small by
sqrt(2) under fan-in rules), a confounder when the routes are compared.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import sys
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from slimkit.core.graph import ChannelGraph
from slimkit.core.plan import check_split_rate, kels_plan
from slimkit.core.surgery import cut
from slimkit.models import create_model

__all__ = ["slim_network", "InitCall"]

_REPLAYABLE_OPS = {"normal_", "uniform_", "fill_", "zero_"}  # in-place writes that can be run on another shape


@dataclasses.dataclass(frozen=True)
class InitCall:
    """One recorded initialisation of a parameter: ``fn(param, *args, **kwargs)``; ``fn`` None means
    the last write cannot be replayed (the construction value is kept)."""

    fn: Callable[..., Any] | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _outer_init_frame():
    """The outermost frame inside torch.nn.init on the stack (e.g. kaiming_normal_ calling tensor.normal_)."""
    outer, f = None, sys._getframe(1)
    while f is not None:
        if f.f_code.co_filename.replace("\\", "/").endswith("torch/nn/init.py") and not f.f_code.co_name.startswith("_"):
            outer = f
        f = f.f_back
    return outer


def _in_place(name: str) -> bool:
    """An in-place tensor method (``mul_``, ``erfinv_``, ``copy_``) or an indexed write."""
    return name == "__setitem__" or (name.endswith("_") and not name.startswith("_"))


class _Recorder(TorchFunctionMode):
    """Records, per parameter storage, the initialisation calls made while a source builds itself."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[tuple[int, int], InitCall]] = []  # ((data_ptr, numel), call), in order
        self.keep: list[torch.Tensor] = []  # keeps recorded tensors alive: no data_ptr is reused meanwhile
        self.seen: set[tuple[int, int]] = set()  # storages written by an init call: later in-place ops count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if getattr(func, "__module__", "") == "torch.nn.init" and not name.startswith("_"):
            args = list(args)  # a dispatching init function (uniform_, kaiming_uniform_, ...): inner ops are unseen
            t = kwargs.pop("tensor") if "tensor" in kwargs else args.pop(0)
            self._add(t, InitCall(func, tuple(args), dict(kwargs)))
            return func(t, *args, **kwargs)
        if not (args and isinstance(args[0], torch.Tensor)):
            return func(*args, **kwargs)
        try:
            key = (args[0].data_ptr(), args[0].numel())
        except (RuntimeError, NotImplementedError):  # a tensor without storage (meta, sparse): not a parameter
            return func(*args, **kwargs)
        if name in _REPLAYABLE_OPS or (key in self.seen and _in_place(name)):
            frame = _outer_init_frame()
            if frame is not None:  # a non-dispatching init function (kaiming_normal_, ones_): record it, not its op
                fn = getattr(torch.nn.init, frame.f_code.co_name)
                code = frame.f_code
                names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
                call = {n: frame.f_locals[n] for n in names if n in frame.f_locals}
                t = call.pop("tensor", args[0])
                self._add(t, InitCall(fn, (), call))
            else:  # a bare write; one that cannot be replayed (erfinv_ after uniform_, copy_) keeps the built value
                op = getattr(torch.Tensor, name) if name in _REPLAYABLE_OPS else None
                self._add(args[0], InitCall(op, tuple(args[1:]), kwargs))
        return func(*args, **kwargs)

    def _add(self, t: torch.Tensor, call: InitCall) -> None:
        self.keep.append(t)
        self.seen.add((t.data_ptr(), t.numel()))
        self.calls.append(((t.data_ptr(), t.numel()), call))


def _default_bias_bounds(model: nn.Module) -> dict[str, float]:
    """PyTorch's default conv/linear bias bound, 1/sqrt(fan_in), of every such layer with a bias."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            fan_in = m.weight[0].numel()  # C_in/groups * kh * kw, or in_features
            out[f"{name}.bias" if name else "bias"] = round(1.0 / math.sqrt(fan_in), 12) if fan_in else 0.0
    return out


def _uniform_bounds(call: InitCall) -> tuple[float, float] | None:
    """(low, high) of a recorded uniform draw, rounded so a recomputed bound compares equal."""
    if call.fn is nn.init.uniform_:
        lo, hi = call.kwargs.get("a", 0.0), call.kwargs.get("b", 1.0)
    elif call.fn is torch.Tensor.uniform_:
        lo = call.args[0] if len(call.args) > 0 else call.kwargs.get("from", 0.0)
        hi = call.args[1] if len(call.args) > 1 else call.kwargs.get("to", 1.0)
    else:
        return None
    return round(float(lo), 12), round(float(hi), 12)


def _accepts_generator(fn: Callable[..., Any]) -> bool:
    if fn in (torch.Tensor.normal_, torch.Tensor.uniform_):
        return True
    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def _replay(model: nn.Module, calls: dict[str, InitCall], dense_bounds: dict[str, float],
            generator: torch.Generator) -> None:
    slim_bounds = _default_bias_bounds(model)
    for name, call in calls.items():  # insertion order: the order the source initialised its parameters
        if call.fn is None:
            continue
        p = model.get_parameter(name)
        args, kwargs = list(call.args), dict(call.kwargs)
        if name in dense_bounds and _uniform_bounds(call) == (-dense_bounds[name], dense_bounds[name]):
            args, kwargs = [], {"a": -slim_bounds[name], "b": slim_bounds[name]}  # PyTorch's default bias rule
            call = InitCall(nn.init.uniform_, (), kwargs)
        if _accepts_generator(call.fn):
            kwargs["generator"] = generator
        elif "generator" in kwargs:
            kwargs.pop("generator")
        call.fn(p, *args, **kwargs)


def slim_network(arch: str, split_rate: float, num_classes: int | None = None,
                 model_args: dict[str, Any] | None = None, input_shape: tuple[int, ...] | None = None,
                 generator: torch.Generator | None = None) -> nn.Module:
    """The dense source ``arch`` cut to its KELS widths at ``split_rate`` and initialised afresh.

    Its parameter count and every layer width equal the extracted fit hypothesis of the same source
    at the same rate; it carries the source's ModelSpec and the KELS plan, so ``slimkit.save`` /
    ``load`` / ``export`` treat it as they treat an extracted fit hypothesis. The weights are the
    source's own initialisation at the slim widths (module docstring), drawn from ``generator``
    (default: a generator seeded 0); the global RNG is left as it was. A split rate outside (0, 1) is
    refused first, a network with a construct slimkit cannot cut before it is traced.
    """
    sr = check_split_rate(split_rate)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    args = dict(model_args or {})
    if num_classes is not None:  # as `train` builds its network: a source without the argument refuses it
        args["num_classes"] = num_classes
    build_seed = int(torch.randint(0, 2**62, (1,), generator=gen))  # construction draws are seeded too
    rec = _Recorder()
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
        torch.manual_seed(build_seed)
        with rec:
            model = create_model(arch, input_shape=input_shape, **args)
    names = {(p.data_ptr(), p.numel()): n for n, p in model.named_parameters()}
    calls: dict[str, InitCall] = {}
    for key, call in rec.calls:
        if key in names:
            calls.pop(names[key], None)  # keep the order of each parameter's last call
            calls[names[key]] = call
    rec.keep.clear()
    dense_bounds = _default_bias_bounds(model)
    graph = ChannelGraph(model, model.slimkit_spec.input_shape)  # refuses an uncuttable construct first
    cut(graph, kels_plan(graph, sr))
    _replay(model, calls, dense_bounds, gen)
    return model.eval()
