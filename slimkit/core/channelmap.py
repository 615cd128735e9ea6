"""Exact channel coupling through shuffles, splits, fixed filters and layer scale: channel labels.

torch-pruning's dependency graph maps channel indices through concatenations and flattens, but a
channel shuffle (reshape into groups, transpose, flatten back) passes through it as the identity,
its map through a split joined back by a concatenation can name the wrong chunk, and it does not
follow a fixed per-channel filter (``F.conv2d`` with a buffer) or a per-channel parameter multiplied
in (layer scale). For networks with those constructs the coupling is read here instead, by one
forward pass (batch 1) in which every element of every activation carries a *label*: the output
channel of the conv/linear layer it came from. Data movement (view, reshape, transpose, permute,
cat, split, chunk, slicing, stack, pad) is applied to the labels themselves, so any permutation of
channels is followed exactly; an element computed from several elements (an add, a product, a
reduction, a softmax over a dimension) ties their labels (union-find). Labels tied together are one
*channel class*: cutting it removes it from every layer that produces or reads it. A channel that
reaches the network's output or an operation this module does not follow is pinned (never cut).
The layers' own pruning functions are torch-pruning's.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from slimkit.core.errors import SlimkitError

__all__ = ["LabelTrace", "trace_labels", "PINNED", "NONE"]

PINNED, NONE = 0, -1  # a class never cut (the image, the outputs); an element of no channel (padding)

# pure data movement: the op applied to the labels gives the output's labels (first argument only,
# or a list of tensors for cat/stack)
_MOVE = {
    "view", "reshape", "flatten", "unflatten", "transpose", "permute", "contiguous", "clone", "__getitem__",
    "split", "chunk", "split_with_sizes", "tensor_split", "unbind", "narrow", "squeeze", "unsqueeze", "expand",
    "expand_as", "repeat", "flip", "roll", "movedim", "moveaxis", "swapaxes", "swapdims", "t", "pixel_shuffle",
    "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle", "view_as", "reshape_as", "select",
    "cat", "concat", "concatenate", "stack", "pad", "unfold",
}
_LIST_MOVE = {"cat", "concat", "concatenate", "stack"}
_REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "softmax", "log_softmax", "logsumexp", "prod", "std",
           "var", "norm", "normalize", "cumsum", "cumprod", "cummax", "cummin", "argmax", "argmin", "_softmax",
           "sort", "argsort", "topk", "median", "kthvalue"}
_SKIP = {"size", "dim", "numel", "__get__", "item", "tolist", "__len__", "__bool__", "__format__", "__repr__",
         "is_contiguous", "stride", "data_ptr", "element_size"}
_CHANNEL_MODULES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU)


def _dim(args, kwargs, x) -> int:
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    return dim % x.dim() if isinstance(dim, int) else -1


class _Uf:
    """Union-find over integer labels; the smaller label is the root, so PINNED (0) stays a root."""

    def __init__(self):
        self.parent = [0]

    def new(self, n: int) -> torch.Tensor:
        base = len(self.parent)
        self.parent.extend(range(base, base + n))
        return torch.arange(base, base + n)

    def find(self, a: int) -> int:
        p, root = self.parent, a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if not bool(keep.any()):
            return
        for x, y in torch.unique(torch.stack([a[keep], b[keep]], 1), dim=0).tolist():
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)


@dataclasses.dataclass
class LabelTrace:
    """What one labelled forward saw: per layer, its output labels and the labels it reads."""

    uf: _Uf
    produced: dict[str, torch.Tensor]  # conv/linear name -> label of each output channel
    read: dict[str, torch.Tensor]  # conv/linear name -> label of each input channel (not for depthwise)
    followers: list[tuple[str, Any, torch.Tensor]]  # (kind, where, labels of dim 0 / the cut dimension)
    splits: list[tuple[str, Any, list[int], torch.Tensor]]  # (module, size(s) given, piece widths, input labels)
    multipliers: set[str] = dataclasses.field(default_factory=set)  # depthwise convs with k > 1 outputs per input

    def classes(self, labels: torch.Tensor) -> list[int]:
        return [self.uf.find(int(x)) if x >= 0 else NONE for x in labels.tolist()]


class _Mode(TorchFunctionMode):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.uf = _Uf()
        self.lab: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor kept alive, labels)
        self.chan: dict[int, torch.Tensor] = {}  # id -> per-channel labels (dim 1), when known
        self.state: dict[int, tuple[torch.Tensor, str, bool]] = {}  # id -> (tensor, param/buffer name, a pure view)
        for n, p in model.named_parameters():
            self.state[id(p)] = (p, "param:" + n, True)
        for n, b in model.named_buffers():
            self.state[id(b)] = (b, "buffer:" + n, True)
        self.stack: list[str] = []
        self.inside = 0  # >0 inside a layer handled whole (conv, linear, BN, ...)
        self.busy = False
        self.trace = LabelTrace(self.uf, {}, {}, [], [])

    # -- labels -------------------------------------------------------------------------------
    def put(self, t: torch.Tensor, labels: torch.Tensor, chan: torch.Tensor | None = None) -> None:
        self.lab[id(t)] = (t, labels)
        if chan is not None:
            self.chan[id(t)] = chan
        else:
            self.chan.pop(id(t), None)

    def put_chan(self, t: torch.Tensor, chan: torch.Tensor, dim: int = 1) -> None:
        shape = [1] * t.dim()
        shape[dim] = chan.numel()
        self.put(t, chan.view(shape).expand(t.shape), chan if dim == 1 else None)

    def labels(self, t: Any) -> torch.Tensor | None:
        e = self.lab.get(id(t)) if isinstance(t, torch.Tensor) else None
        return e[1] if e is not None and e[0] is t else None

    def channels(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """One label per index of ``dim``; the labels an index holds elsewhere are tied to it."""
        if dim == 1 and id(t) in self.chan:
            return self.chan[id(t)]
        full = self.labels(t)
        moved = full.movedim(dim, 0).reshape(full.shape[dim], -1)
        cand = moved.amax(dim=1)
        self.uf.union_pairs(moved, cand[:, None])
        if dim == 1:
            self.chan[id(t)] = cand
        return cand

    def where(self) -> str:
        return self.stack[-1] if self.stack else ""

    def refuse(self, what: str) -> None:
        raise SlimkitError(f"layer {self.where() or '(model)'}: {what}; slimkit cannot cut this network exactly")

    # -- operations ---------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if self.inside or self.busy or name in _SKIP:
            return out
        flat, _ = tree_flatten((args, kwargs))
        tracked = [t for t in flat if self.labels(t) is not None]
        self.busy = True
        try:
            if tracked:
                self._op(func, name, args, kwargs, out, tracked)
            elif isinstance(out, torch.Tensor):
                states = [self.state[id(t)] for t in flat if isinstance(t, torch.Tensor) and id(t) in self.state]
                if states:  # a tensor computed from parameters/buffers only: remember where it came from
                    src = states[0]
                    view = len(states) == 1 and src[2] and (name in _MOVE or name in ("to", "float", "double", "type_as"))
                    self.state[id(out)] = (src[0], src[1], view)
        finally:
            self.busy = False
        return out

    def _op(self, func, name, args, kwargs, out, tracked) -> None:
        if name == "__setitem__":
            base, value = args[0], args[2]
            labels = self.labels(base).clone()
            v = self.labels(value)
            labels[args[1]] = v if v is not None else NONE
            self.put(base, labels)
            return
        if name in _MOVE:
            return self._move(func, name, args, kwargs, out)
        if name == "conv2d":
            return self._functional_conv(args, kwargs, out)
        if name in ("linear", "conv1d", "conv3d", "batch_norm", "layer_norm", "group_norm", "instance_norm", "bilinear"):
            self.refuse(f"functional {name} outside its nn layer: its weight does not follow the cut")
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        binary = len(args) > 1 and isinstance(args[1], torch.Tensor)  # torch.max(a, b) is elementwise
        if (name in _REDUCE or (name.endswith("_") and name[:-1] in _REDUCE)) and not binary:
            return self._reduce(name, args, kwargs, outs, tracked)
        if not outs:
            return
        o = outs[0]
        # elementwise with broadcasting (an add, a gate, a mask): aligned elements are tied
        try:
            bshape = torch.broadcast_shapes(*(t.shape for t in tracked))
        except RuntimeError:
            bshape = None
        if bshape == o.shape:
            first = next((t for t in tracked if t.shape == o.shape), tracked[0])
            for t in tracked:
                if t is not first:
                    self._union_aligned(first, t)
            self._constants(args, kwargs, first, o)
            lab = self.labels(first).expand(o.shape)
            for x in outs:
                if x.shape == o.shape:
                    self.put(x, lab, self.chan.get(id(first)) if first.shape == o.shape else None)
            return
        ref = max(tracked, key=lambda t: t.numel())
        if o.dim() == ref.dim() == 4 and o.shape[:2] == ref.shape[:2]:  # pooling, interpolation: per channel
            ch = self.channels(ref)
            for t in tracked:
                if t is not ref:
                    if t.dim() == 4 and t.shape[1] == ref.shape[1]:
                        self.uf.union_pairs(ch, self.channels(t))
                    else:
                        self._pin(t)
            self._constants(args, kwargs, ref, o)
            for x in outs:
                if x.dim() == 4 and x.shape[:2] == o.shape[:2]:
                    self.put_chan(x, ch)
            return
        for t in tracked:  # an operation not followed: its inputs are never cut, its output is a constant
            self._pin(t)

    def _union_aligned(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.dim() == b.dim() >= 2 and a.shape[1] == b.shape[1] and id(a) in self.chan and id(b) in self.chan:
            self.uf.union_pairs(self.chan[id(a)], self.chan[id(b)])  # per channel: no need to expand
        else:
            self.uf.union_pairs(self.labels(a), self.labels(b))

    def _pin(self, t: torch.Tensor) -> None:
        self.uf.union_pairs(self.labels(t), torch.tensor(PINNED))

    def _move(self, func, name, args, kwargs, out) -> None:
        def sub(t):
            lab = self.labels(t)
            if lab is not None:
                return lab
            return torch.full(t.shape, NONE, dtype=torch.long) if isinstance(t, torch.Tensor) else t

        if name in _LIST_MOVE:
            a = [[sub(t) for t in args[0]], *args[1:]]
        else:
            a = [sub(args[0]), *args[1:]]
        kw = dict(kwargs)
        if name == "pad":
            mode = kw.get("mode", args[2] if len(args) > 2 else "constant")
            if mode == "constant":
                a, kw = a[:2], {"mode": "constant", "value": NONE}
        try:
            res = func(*a, **kw)
        except (RuntimeError, NotImplementedError):  # expanded labels, or no integer kernel (reflect pad):
            # the same movement on a contiguous float64 copy (labels below 2**53 are exact in it)
            a = [[x.double().contiguous() for x in a[0]] if name in _LIST_MOVE else a[0].double().contiguous(), *a[1:]]
            res = func(*a, **kw)
            res = tuple(r.long() for r in res) if isinstance(res, (tuple, list)) else res.long()
        for o, lab in zip(tree_flatten(out)[0], tree_flatten(res)[0]):
            if isinstance(o, torch.Tensor) and isinstance(lab, torch.Tensor) and lab.shape == o.shape:
                self.put(o, lab)
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 4):
            return  # dimension 1 is a channel dimension only in (N, C) and (N, C, H, W)
        if name in ("view", "reshape", "unflatten") and isinstance(out, torch.Tensor) and out.dim() > x.dim() \
                and out.shape[0] == x.shape[0] and 1 < out.shape[1] < x.shape[1] and x.shape[1] % out.shape[1] == 0:
            # channels reshaped into g groups (a shuffle, split attention): after the cut the groups are
            # re-formed from the new width, so every group must keep the same positions: tie them
            self._tie(self.channels(x), out.shape[1])
        if name in ("split", "split_with_sizes", "chunk", "tensor_split", "unbind") and _dim(args, kwargs, x) == 1:
            size = args[1] if len(args) > 1 else next(
                (kwargs[k] for k in ("split_size_or_sections", "split_size", "chunks", "sections") if k in kwargs), None)
            if name == "chunk" and len({o.shape[1] for o in out}) == 1:
                # chunk re-forms equal pieces from the cut width: every piece keeps the same positions
                self._tie(self.channels(x)[: sum(o.shape[1] for o in out)], len(out))
            # a split by sizes: the plan cuts every piece as a cell of its own, and the sizes a module
            # stores are rewritten to the cut widths (prune_labelled)
            self.trace.splits.append((self.where(), size, [o.shape[1] for o in out], self.channels(x)))
        if name == "__getitem__" and isinstance(args[1], tuple) and len(args[1]) >= 2 and args[1][0] == slice(None) \
                and isinstance(args[1][1], slice) and args[1][1].step in (None, 1):
            # x[:, a:b] with bounds a module stores (ReXNet, DPN): the pieces are cells of their own and
            # the bounds are rewritten to the cut widths
            c = x.shape[1]
            a, b, _ = args[1][1].indices(c)
            self.trace.splits.append((self.where(), ("slice", a, b), [a, b - a, c - b], self.channels(x)))

    def _tie(self, ch: torch.Tensor, g: int) -> None:
        v = ch.reshape(g, -1)
        self.uf.union_pairs(v, v[:1])

    def _reduce(self, name, args, kwargs, outs, tracked) -> None:
        x = tracked[0]
        lab = self.labels(x)
        if name in ("norm", "normalize"):  # norm(x, p, dim), normalize(x, p=2.0, dim=1)
            dim = kwargs.get("dim", args[2] if len(args) > 2 else (1 if name == "normalize" else None))
        else:
            dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else None)
        dims = list(range(x.dim())) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
        dims = sorted(d % x.dim() for d in dims)
        moved = lab.movedim(dims, list(range(x.dim() - len(dims), x.dim())))
        flat = moved.reshape(*moved.shape[: x.dim() - len(dims)], -1)
        self.uf.union_pairs(flat, flat[..., :1])  # everything reduced together is one class
        rep = flat.amax(dim=-1)
        for o in outs:
            if o.is_floating_point() or o.dtype == lab.dtype:
                if o.shape == x.shape:
                    self.put(o, lab)
                elif o.numel() == rep.numel():
                    self.put(o, rep.reshape(o.shape))

    def _constants(self, args, kwargs, x, o) -> None:
        """A parameter/buffer that varies along x's channels (layer scale) is cut with them; any other
        per-channel constant is refused."""
        if x.dim() < 2 or x.shape[1] <= 1 or bool((self.labels(x) == PINNED).all()):
            return  # one channel, or the image's own channels (an input normalisation): nothing is cut
        for t in tree_flatten((args, kwargs))[0]:
            if not isinstance(t, torch.Tensor) or self.labels(t) is not None or t.dim() == 0:
                continue
            aligned = [1] * (o.dim() - t.dim()) + list(t.shape)
            if len(aligned) != o.dim() or aligned[1] <= 1:
                continue  # constant across channels
            src = self.state.get(id(t))
            if src is None or not src[2] or src[0].numel() != x.shape[1] or x.dim() not in (2, 4):
                what = src[1].split(":", 1)[1] if src else "a tensor made in the forward"
                self.refuse(f"a per-channel constant computed from {what} multiplies or shifts the channels; "
                            "no exact cutting rule")
            p = src[0]
            dim = next(i for i, s in enumerate(p.shape) if s > 1)
            self.trace.followers.append(("tensor", src[1], dim, self.channels(x)))

    def _functional_conv(self, args, kwargs, out) -> None:
        x, w = args[0], args[1]
        groups = kwargs.get("groups", args[6] if len(args) > 6 else 1)
        bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
        src = self.state.get(id(w))
        c = x.shape[1]
        if not (groups == c == out.shape[1] and w.shape[1] == 1 and bias is None and src is not None
                and not src[1].startswith("param:")):
            self.refuse("functional convolution outside an nn.Conv2d (other than a fixed depthwise filter): "
                        "its weight does not follow the cut")
        ch = self.channels(x)
        if src[0].shape[0] == c and src[2]:
            self.trace.followers.append(("filter", src[1], 0, ch))
        elif src[0].shape[0] != 1:  # one kernel expanded to every channel follows the cut by itself
            self.refuse("fixed depthwise filter computed in the forward: it does not follow the cut")
        self.put_chan(out, ch)

    # -- layers handled whole -----------------------------------------------------------------
    def _record(self, name: str, new: torch.Tensor, read: torch.Tensor | None) -> None:
        """A layer run twice (shared weights) produces and reads the same channels both times."""
        tr = self.trace
        if name in tr.produced:
            self.uf.union_pairs(tr.produced[name], new)
            if read is not None:
                self.uf.union_pairs(tr.read[name], read)
            return
        tr.produced[name] = new
        if read is not None:
            tr.read[name] = read

    def layer(self, name: str, m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        if self.labels(x) is None:
            self.put(x, torch.full(x.shape, NONE, dtype=torch.long))
        if isinstance(m, nn.Linear):
            read = self.channels(x, x.dim() - 1)
            new = self.uf.new(m.out_features)
            self._record(name, new, read)
            self.put_chan(out, new, out.dim() - 1)
        elif isinstance(m, nn.Conv2d):
            read = self.channels(x)
            new = self.uf.new(m.out_channels)
            if 1 < m.groups == m.in_channels:  # depthwise (x k): outputs k*i .. k*i+k-1 read input i only
                self.uf.union_pairs(new.view(m.in_channels, -1), read[:, None])
                read = None
                if m.out_channels != m.in_channels:
                    self.trace.multipliers.add(name)
            self._record(name, new, read)
            self.put_chan(out, new)
        else:  # BN, GroupNorm, InstanceNorm, PReLU: channel-wise, with per-channel state
            ch = self.channels(x)
            n = getattr(m, "num_parameters", None)
            if n != 1:
                self.trace.followers.append(("module", name, 1, ch))
            self.put_chan(out, ch)


def trace_labels(model: nn.Module, input_shape: tuple[int, ...]) -> LabelTrace:
    """Run ``model`` once at batch 1 (eval mode, no grad) following channel labels."""
    mode = _Mode(model)
    handles = []
    for name, m in model.named_modules():
        whole = isinstance(m, (nn.Conv2d, nn.Linear) + _CHANNEL_MODULES)

        def pre(mod, inp, name=name, whole=whole):
            mode.stack.append(name)
            if whole:
                mode.inside += 1

        def post(mod, inp, out, name=name, whole=whole):
            mode.stack.pop()
            if whole:
                mode.inside -= 1
                if mode.inside == 0 and inp and isinstance(inp[0], torch.Tensor) and isinstance(out, torch.Tensor):
                    mode.busy = True
                    try:
                        mode.layer(name, mod, inp[0], out)
                    finally:
                        mode.busy = False

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    p = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu")
    mode.put(x, torch.full(x.shape, PINNED, dtype=torch.long))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.no_grad(), mode:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for o in tree_flatten(out)[0]:
        if isinstance(o, torch.Tensor) and mode.labels(o) is not None:
            mode._pin(o)
    return mode.trace

