"""Model registry: torchvision classifiers by name plus small nets for small images.

Every model slimkit creates carries a :class:`ModelSpec` (``model.slimkit_spec``): the registry
name, the complete constructor arguments and the input shape. Checkpoints store the spec, so a
network is rebuilt from its name and arguments and never unpickled.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.errors import SlimkitError

__all__ = ["ModelSpec", "register_model", "create_model", "list_models", "model_params", "model_signature", "input_shape_of", "spec_of"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a dense network: registry name, constructor arguments, input shape (C, H, W)."""

    arch: str
    args: dict[str, Any]
    input_shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch, "args": dict(self.args), "input_shape": list(self.input_shape)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(arch=str(d["arch"]), args=dict(d["args"]), input_shape=tuple(int(s) for s in d["input_shape"]))


@dataclasses.dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    input_shape: Callable[[dict[str, Any]], tuple[int, ...]]
    family: str  # "torchvision" or "small"


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, input_shape, family: str = "small"):
    """Decorator adding a factory to the registry.

    ``input_shape`` is a fixed (C, H, W) tuple or a function of the complete constructor arguments.
    """
    shape_fn = input_shape if callable(input_shape) else (lambda args, s=tuple(input_shape): s)

    def deco(factory):
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice")
        _REGISTRY[name] = _Entry(factory, shape_fn, family)
        return factory

    return deco


def list_models(family: str | None = None) -> list[str]:
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise SlimkitError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_signature(name: str) -> str:
    """``name(arg=default, ...)``: what a registry model takes, for `slimkit models` and error messages."""
    sig = inspect.signature(_entry(name).factory)
    return f"{name}(" + ", ".join(f"{k}={v.default!r}" if v.default is not inspect.Parameter.empty else k
                                  for k, v in sig.parameters.items()) + ")"


def model_params(name: str) -> list[str]:
    """Constructor arguments a registry model takes (e.g. to know whether it has ``in_chans``)."""
    return list(inspect.signature(_entry(name).factory).parameters)


def _bind(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Complete constructor arguments (defaults filled in); unknown arguments are refused."""
    sig = inspect.signature(_entry(name).factory)
    unknown = sorted(set(kwargs) - set(sig.parameters))
    if unknown:
        raise SlimkitError(
            f"model {name!r} takes no argument {', '.join(unknown)}; it takes: {', '.join(sig.parameters)}"
        )
    bound = sig.bind(**kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def input_shape_of(name: str, **kwargs: Any) -> tuple[int, ...]:
    """The (C, H, W) input a registry model built with ``kwargs`` takes, without building it."""
    return tuple(_entry(name).input_shape(_bind(name, kwargs)))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registry model with random weights, in eval mode, with its ModelSpec attached."""
    entry = _entry(name)
    args = _bind(name, kwargs)
    if "num_classes" in args and (not isinstance(args["num_classes"], int) or args["num_classes"] < 1):
        raise SlimkitError(f"num_classes must be a positive integer, got {args['num_classes']!r}")
    model = entry.factory(**args)
    model.slimkit_spec = ModelSpec(name, args, tuple(entry.input_shape(args)))
    return model.eval()


def spec_of(model: nn.Module) -> ModelSpec:
    spec = getattr(model, "slimkit_spec", None)
    if spec is None:
        raise SlimkitError(
            "this model was not created by slimkit.create_model and carries no ModelSpec; "
            "build it with slimkit.create_model(name, ...) or load it with slimkit.load(path)"
        )
    return spec


# --- torchvision classifiers (3x224x224 inputs) -------------------------------------------------

def _tv(fn_name: str):
    def factory(num_classes: int = 1000) -> nn.Module:
        import torchvision.models as tvm  # imported here: `import slimkit` stays light

        return getattr(tvm, fn_name)(weights=None, num_classes=num_classes)

    factory.__name__ = fn_name
    return factory


for _name in ("resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn", "mobilenet_v2", "densenet121"):
    register_model(_name, input_shape=(3, 224, 224), family="torchvision")(_tv(_name))


# --- small nets for small images (the bundled 8x8 digits, CIFAR-sized data) --------------------

class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            # projection shortcut (ResNet "option B"): keeps every stage a clean residual stream
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) of He et al. for small images: three stages of width w, 2w, 4w."""

    def __init__(self, num_classes: int, depth: int, width: int, in_chans: int):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise SlimkitError(f"cifar_resnet depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, num_classes)


@register_model("cifar_resnet", input_shape=lambda a: (a["in_chans"], a["image_size"], a["image_size"]))
def cifar_resnet(num_classes: int = 10, depth: int = 20, width: int = 16, in_chans: int = 3,
                 image_size: int = 32) -> nn.Module:
    # image_size does not change the weights; it is recorded so the checkpoint knows its input shape
    return CifarResNet(num_classes, depth, width, in_chans)


class SmallVGG(nn.Module):
    """Conv-BN-ReLU stages with max-pooling, then a flatten and a two-layer classifier.

    The flatten makes the first Linear read C*H*W features, the case where a Linear must follow the
    channels it reads.
    """

    def __init__(self, num_classes: int, widths: tuple[int, ...], in_chans: int, image_size: int, hidden: int):
        super().__init__()
        layers, cin, size = [], in_chans, image_size
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, 1, 1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin, size = w, size // 2
        if size < 1:
            raise SlimkitError(f"small_vgg: image_size {image_size} is too small for {len(widths)} pooling stages")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(cin * size * size, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("small_vgg", input_shape=lambda a: (a["in_chans"], a["image_size"], a["image_size"]))
def small_vgg(num_classes: int = 10, widths: tuple[int, ...] = (32, 64), in_chans: int = 1, image_size: int = 8,
              hidden: int = 128) -> nn.Module:
    return SmallVGG(num_classes, tuple(widths), in_chans, image_size, hidden)


class MLP(nn.Module):
    """Flatten, then Linear-ReLU layers: the network of the DEN experiments."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int):
        super().__init__()
        layers, cin = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.ReLU(inplace=True)]
            cin = h
        layers.append(nn.Linear(cin, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model("mlp", input_shape=lambda a: (a["in_chans"], a["image_size"], a["image_size"]))
def mlp(num_classes: int = 10, hidden: tuple[int, ...] = (312, 128), in_chans: int = 1, image_size: int = 8) -> nn.Module:
    return MLP(in_chans * image_size * image_size, tuple(hidden), num_classes)


class DENNet(nn.Module):
    """A multi-task network whose hidden units carry timestamps (Dynamically Expandable Networks).

    ``hidden`` holds the unit layers in order: 3x3 convs (units are channels; ReLU, then 2x2 max-pool
    while the map is at least 2 wide, and a global average pool after the last) followed by Linear
    layers (units are neurons). ``stamp{l}`` records the task (1-based) at which each unit of layer l
    was added. ``forward(x, task)`` is timestamped inference: the subnetwork of units stamped <= ``task``
    answers through head ``task``; later units take no part. ``forward(x)`` runs every unit and concatenates all heads (what
    tracing and surgery see).
    """

    def __init__(self, input_shape: tuple[int, ...], hidden: tuple[int, ...], heads: tuple[int, ...],
                 channels: tuple[int, ...] = ()):
        super().__init__()
        self.hidden = nn.ModuleList()
        self.n_conv = len(channels)
        cin, size = input_shape[0], input_shape[-1]
        self._pool = []
        for ch in channels:
            self.hidden.append(nn.Conv2d(cin, ch, 3, padding=1))
            self._pool.append(size >= 2)
            size = size // 2 if size >= 2 else size
            cin = ch
        if not channels:
            cin = math.prod(input_shape)  # plain arithmetic: no tensor on the default device
        for h in hidden:
            self.hidden.append(nn.Linear(cin, h))
            cin = h
        for i, layer in enumerate(self.hidden):
            self.register_buffer(f"stamp{i}", torch.ones(layer.weight.shape[0], dtype=torch.long))
        self.heads = nn.ModuleList(nn.Linear(cin, n) for n in heads)

    def stamps(self) -> list[torch.Tensor]:
        return [getattr(self, f"stamp{i}") for i in range(len(self.hidden))]

    def units(self, task: int) -> list[torch.Tensor]:
        """Indices of each hidden layer's units stamped <= ``task``, in their row order."""
        return [torch.nonzero(s <= task).flatten() for s in self.stamps()]

    def features(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Hidden features: of every unit, or (``task`` given) of the subnetwork of units stamped <= task.

        Timestamped inference computes with that subnetwork's weights gathered into dense tensors,
        not with later units silenced: growth appends rows and columns but leaves the gathered
        tensors (values and shapes) of earlier tasks unchanged, so task t's outputs after growth are
        the same computation as before it, on any machine.
        """
        return self._features(x, self.units(task) if task is not None else None)

    def _features(self, x: torch.Tensor, keep: list[torch.Tensor] | None) -> torch.Tensor:
        h = x if self.n_conv else x.flatten(1)
        prev = None  # indices of the previous layer's kept units (None: all inputs)
        for i, layer in enumerate(self.hidden):
            if keep is None:
                h = layer(h)
            else:
                w, b = layer.weight.index_select(0, keep[i]), layer.bias.index_select(0, keep[i])
                if prev is not None:
                    w = w.index_select(1, prev)
                h = layer._conv_forward(h, w, b) if isinstance(layer, nn.Conv2d) else F.linear(h, w, b)
                prev = keep[i]
            h = torch.relu(h)
            if i < self.n_conv and self._pool[i]:
                h = F.max_pool2d(h, 2)
            if i == self.n_conv - 1:
                h = h.mean((2, 3))
        return h

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        if task is None:
            h = self._features(x, None)
            return torch.cat([head(h) for head in self.heads], 1)
        keep = self.units(task)
        head = self.heads[task - 1]
        return F.linear(self._features(x, keep), head.weight.index_select(1, keep[-1]), head.bias)


@register_model("den_mlp", input_shape=lambda a: (a["in_chans"], a["image_size"], a["image_size"]))
def den_mlp(num_classes: int = 2, hidden: tuple[int, ...] = (312, 128), heads: tuple[int, ...] | None = None,
            in_chans: int = 1, image_size: int = 8) -> nn.Module:
    """DEN's MLP. ``heads`` lists each task's classes; without it, one head of ``num_classes``."""
    return DENNet((in_chans, image_size, image_size), tuple(hidden), _heads(heads, num_classes))


def _heads(heads, num_classes: int) -> tuple[int, ...]:
    return tuple(heads) if heads is not None else (num_classes,)


@register_model("den_conv", input_shape=lambda a: (a["in_chans"], a["image_size"], a["image_size"]))
def den_conv(num_classes: int = 2, channels: tuple[int, ...] = (16, 32), hidden: tuple[int, ...] = (),
             heads: tuple[int, ...] | None = None, in_chans: int = 1, image_size: int = 8) -> nn.Module:
    """DEN's conv variant: units are channels (3x3 convs, max-pool, global average pool), then Linear units."""
    if not channels:
        raise SlimkitError("den_conv needs at least one conv layer")
    return DENNet((in_chans, image_size, image_size), tuple(hidden), _heads(heads, num_classes), tuple(channels))
