"""Constructs slimkit has no exact cutting rule for, found before any heavy work.

One forward pass on meta tensors (no memory, no compute; a real forward when the model cannot run
on meta) watches the operations each module performs. Attention (a product of two activations,
scaled-dot-product attention), normalisation over channels (LayerNorm, GroupNorm with several
channels per group), weight standardisation, functional convolutions with a learned weight and
parameters of other shapes than a per-channel vector have no rule that keeps slim == masked here,
so the model is refused in one line naming the layer (the module whose forward did it) and the
construct, instead of being traced for minutes (ViT, MaxViT) or cut wrongly (ConvNeXt). Attention
is reported first when present. Channels reshaped into groups (a shuffle, split attention), channel
splits, fixed depthwise filters and layer scale have a rule, but torch-pruning's index maps do not
follow them: the scan reports them, and the graph reads their coupling by channel labels
(channelmap.py).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from slimkit.core.errors import SlimkitError

__all__ = ["check_constructs", "Refusal"]


class Refusal(Exception):
    """A construct without a rule, seen at a layer during the scan."""

    def __init__(self, layer: str, construct: str):
        super().__init__(f"layer {layer or '(model)'}: {construct}")
        self.layer, self.construct = layer, construct


def _module_refusal(name: str, m: nn.Module) -> str | None:
    """Constructs visible from the module tree alone."""
    if isinstance(m, nn.MultiheadAttention):
        return "attention (nn.MultiheadAttention)"
    if isinstance(m, (nn.RNNBase,)):
        return "recurrent layer"
    if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Conv1d, nn.Conv3d)):
        return f"{type(m).__name__} (only Conv2d and Linear layers can be cut)"
    return None


class _Scan(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.modules: list[nn.Module] = []
        self.found: list[Refusal] = []  # every construct without a rule, in forward order
        self.params: set[int] = set()  # ids of parameter tensors: a product with one is a layer, not attention
        self.labelled: dict[str, str] = {}  # construct -> first layer, where the rule needs channel labels

    def _where(self) -> str:
        return self.stack[-1] if self.stack else ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        try:
            return self._watch(func, args, kwargs or {})
        except Refusal as r:  # note it and go on: attention is the reason to report when present
            self.found.append(r)
            return func(*args, **(kwargs or {}))

    def first(self) -> Refusal | None:
        attention = [r for r in self.found if r.construct.startswith("attention")]
        return (attention or self.found or [None])[0]

    def _module_is(self, kind: type) -> bool:
        return bool(self.modules) and isinstance(self.modules[-1], kind)

    def _watch(self, func, args, kwargs):
        name = getattr(func, "__name__", "")
        where = self._where()
        if func is torch.nn.functional.scaled_dot_product_attention or name == "multi_head_attention_forward":
            raise Refusal(where, "attention (scaled dot-product attention); KELS is defined for CNNs")
        if name in ("matmul", "bmm", "__matmul__", "baddbmm", "einsum"):
            tensors = [a for a in (args[1:] if name == "einsum" else args) if isinstance(a, torch.Tensor)]
            if name == "einsum" and args and isinstance(args[1], (list, tuple)):
                tensors = [a for a in args[1] if isinstance(a, torch.Tensor)]
            acts = [t for t in tensors if id(t) not in self.params and t.dim() >= 3]
            if len(acts) >= 2:
                raise Refusal(where, "attention (product of two activations); KELS is defined for CNNs")
        if name == "group_norm" and args and isinstance(args[0], torch.Tensor) and args[1] != args[0].shape[1]:
            raise Refusal(where, f"GroupNorm with {args[1]} groups over {args[0].shape[1]} channels: its statistics "
                                 "mix channels, so cutting some changes the others")
        if name == "layer_norm":
            shape = tuple(args[1]) if len(args) > 1 else tuple(kwargs.get("normalized_shape", ()))
            # (B, C) or NHWC with C last, or (C, H, W): the statistics mix the channels a cut removes
            raise Refusal(where, f"LayerNorm over channels (normalized_shape {list(shape)}): its statistics mix "
                                 "channels, so cutting some changes the others")
        if name in ("split", "chunk", "tensor_split", "split_with_sizes", "unbind") and args \
                and isinstance(args[0], torch.Tensor) and args[0].dim() == 4 and _dim_arg(args, kwargs) == 1:
            self.labelled.setdefault("channel split", where or "(model)")
        if name == "batch_norm" and self._module_is(nn.Conv2d):
            raise Refusal(where, "weight standardisation (a conv normalising its own filters): cutting input "
                                 "channels changes every filter's statistics")
        if name == "conv2d" and not self._module_is(nn.Conv2d):
            x, w = args[0], args[1]
            groups = kwargs.get("groups", args[6] if len(args) > 6 else 1)
            if id(w) in self.params or w.dim() != 4 or w.shape[1] != 1 or groups != x.shape[1]:
                raise Refusal(where, "functional convolution outside an nn.Conv2d (other than a fixed depthwise "
                                     "filter): its weight does not follow the cut")
            self.labelled.setdefault("fixed depthwise filter", where or "(model)")
        out = func(*args, **kwargs)
        if name in ("view", "reshape") and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            x = args[0]
            if x.dim() == 4 and out.dim() >= 4 and out.shape[0] == x.shape[0] and 1 < out.shape[1] < x.shape[1] \
                    and x.shape[1] % out.shape[1] == 0 and out.shape[2] > 1 and out[0].numel() == x[0].numel() \
                    and out.shape[-1] == x.shape[-1]:
                self.labelled.setdefault("channels reshaped into groups", where or "(model)")
        return out


def _dim_arg(args, kwargs) -> int:
    """The ``dim`` of a split/chunk call (positional third argument or keyword), default 0."""
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    return dim % 4 if isinstance(dim, int) else -1


def _hooks(model: nn.Module, scan: _Scan):
    handles = []
    for name, m in model.named_modules():
        def pre(mod, inp, name=name):
            scan.stack.append(name)
            scan.modules.append(mod)

        def post(mod, inp, out):
            scan.stack.pop()
            scan.modules.pop()

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    return handles


def check_constructs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, str]:
    """Raise SlimkitError naming the first layer whose construct slimkit cannot cut exactly.

    Returns the constructs seen whose rule needs the channels followed by label (channels reshaped
    into groups, channel split, fixed depthwise filter, layer scale), each with the first layer where
    it was seen: empty for a network torch-pruning's index maps cover exactly."""
    for name, m in model.named_modules():
        why = _module_refusal(name, m)
        if why is not None:
            raise SlimkitError(f"layer {name}: {why}; slimkit cannot cut this network exactly")
    scan = _Scan()
    was_training = model.training
    model.eval()
    handles = _hooks(model, scan)
    try:
        _run(model, input_shape, scan)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    r = scan.first()
    if r is not None:
        raise SlimkitError(f"{r}; slimkit cannot cut this network exactly")
    loose = _check_loose_parameters(model)
    if loose:
        scan.labelled.setdefault("layer scale", loose)
    return scan.labelled


def _check_loose_parameters(model: nn.Module) -> str:
    """A parameter outside conv/linear/BN with one dimension of several entries (layer scale: (C,),
    (C, 1, 1)) is cut with the channels it scales, followed by label (the first one's layer); any
    other (a position embedding, a weight-standardised conv's gain) has no rule."""
    loose = ""
    allowed = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.PReLU)
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        mod = model.get_submodule(owner) if owner else model
        leaf = name.rpartition(".")[2]
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and leaf not in ("weight", "bias"):
            raise SlimkitError(f"layer {owner}: {type(mod).__name__} with an extra parameter {leaf} of shape "
                               f"{list(p.shape)} (e.g. a scaled weight-standardised conv) has no exact cutting rule; "
                               "slimkit cannot cut this network exactly")
        if not isinstance(mod, allowed) and p.numel() > 1:  # a scalar scale/shift treats every channel alike
            if sum(s > 1 for s in p.shape) == 1:
                loose = loose or owner or "(model)"
                continue
            raise SlimkitError(f"layer {owner or '(model)'}: parameter {name.rpartition('.')[2]} of shape "
                               f"{list(p.shape)} outside conv/linear/BN layers (e.g. layer scale) has no exact "
                               "cutting rule; slimkit cannot cut this network exactly")
    return loose


def _run(model: nn.Module, input_shape: tuple[int, ...], scan: _Scan) -> None:
    """One forward at batch 1 under the scan: on meta tensors (shapes only, no compute) when the model
    allows it, else a real one (data-dependent code such as ``.item()`` cannot run on meta)."""
    from torch.func import functional_call

    params = {k: torch.empty_like(v, device="meta") for k, v in model.named_parameters()}
    state = {**params, **{k: torch.empty_like(v, device="meta") for k, v in model.named_buffers()}}
    scan.params = {id(v) for v in params.values()}
    try:
        with torch.inference_mode(False), torch.no_grad(), scan:
            functional_call(model, state, (torch.zeros(1, *input_shape, device="meta"),), strict=False)
        return
    except Exception:
        if scan.found or all(v.is_meta for v in model.parameters()):
            return  # what was seen is reason enough / a meta model has no real forward to fall back to
    scan.stack.clear()
    scan.modules.clear()
    scan.params = {id(v) for v in model.parameters()}
    try:
        with torch.inference_mode(False), torch.no_grad(), scan:
            model(torch.zeros(1, *input_shape))
    except Exception:
        pass  # what was seen is kept; the tracer reports the failure with its own message
