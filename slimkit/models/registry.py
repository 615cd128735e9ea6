"""Model sources: every network slimkit builds is named by where it comes from.

- the built-in nets of this registry by name (``cifar_resnet``, ``resnet18``, ...);
- every torchvision classifier by its torchvision name (``efficientnet_b0``, ``regnet_y_400mf``);
- timm models as ``timm/NAME`` (the optional extra ``slimkit[timm]``);
- the user's own ``package.module:callable`` (a function or class returning an ``nn.Module``),
  imported only because the user named it, and plugins registered under the entry-point group
  ``slimkit.models``.

Every model slimkit creates carries a :class:`ModelSpec` (``model.slimkit_spec``): the source name,
the complete constructor arguments and the input shape. Checkpoints store the spec, so a network is
rebuilt from its name and arguments and never unpickled.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
from typing import Any, Callable, Sequence

from torch import nn

from slimkit.core.errors import SlimkitError, one_line

__all__ = ["ModelSpec", "register_model", "create_model", "list_models", "list_sources", "model_params",
           "model_signature", "input_shape_of", "spec_of", "source_kind", "is_import_path", "zoo_outcomes", "PLUGIN_GROUP"]

PLUGIN_GROUP = "slimkit.models"  # entry-point group of model plugins: name = "package.module:callable"
TIMM_PREFIX = "timm/"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a dense network: source name, constructor arguments, input shape (C, H, W)."""

    arch: str
    args: dict[str, Any]
    input_shape: tuple[int, ...]

    @property
    def source(self) -> str:
        """builtin | torchvision | timm | import | plugin (derived from the name, see source_kind)."""
        return source_kind(self.arch)

    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch, "source": self.source, "args": dict(self.args),
                "input_shape": list(self.input_shape)}

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
    """The core names: small nets (``family="small"``) and torchvision's reference classifiers
    (``family="torchvision"``: resnet18/34/50, vgg11_bn/16_bn, mobilenet_v2, densenet121).

    Every other torchvision classifier, timm model and import path works too: see list_sources.
    """
    small = [n for n, e in _REGISTRY.items() if e.family == "small"]
    names = {"small": small, "torchvision": list(_TV_CORE), None: small + list(_TV_CORE)}.get(family, [])
    return sorted(names)


# --- sources beyond the registry ------------------------------------------------------------------

def is_import_path(name: str) -> bool:
    """``package.module:callable``: the user's own code, imported only when the user names it."""
    return ":" in name and not name.startswith(TIMM_PREFIX)


@functools.lru_cache(maxsize=1)
def _tv_names() -> tuple[str, ...]:
    import torchvision
    import torchvision.models as tvm  # imported here: `import slimkit` stays light

    return tuple(torchvision.models.list_models(module=tvm))


@functools.lru_cache(maxsize=1)
def _plugins() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP)}


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise SlimkitError("timm models need the timm package: pip install slimkit[timm]  (or pip install timm)") from exc
    return timm


def source_kind(name: str) -> str:
    """builtin | plugin | torchvision | timm | import: where ``name`` comes from (nothing is imported)."""
    if name in _REGISTRY:
        return "builtin"
    if name.startswith(TIMM_PREFIX):
        return "timm"
    if is_import_path(name):
        return "import"
    if name in _plugins():
        return "plugin"
    return "torchvision"


def _tv_input_shape(name: str, args: dict[str, Any]) -> tuple[int, ...]:
    if "image_size" in args:  # ViT takes its input size as an argument
        return (3, int(args["image_size"]), int(args["image_size"]))
    return (3, 299, 299) if name == "inception_v3" else (3, 224, 224)


def _tv_class(name: str):
    """The nn.Module class a torchvision builder returns (from its return annotation), or None."""
    import typing

    import torchvision

    builder = torchvision.models.get_model_builder(name)
    try:
        cls = typing.get_type_hints(builder).get("return")
    except Exception:
        cls = None
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def _timm_input_shape(name: str, args: dict[str, Any]) -> tuple[int, ...]:
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(name[len(TIMM_PREFIX):], allow_unregistered=True)
    shape = tuple(int(s) for s in (cfg.input_size if cfg is not None and cfg.input_size else (3, 224, 224)))
    if "in_chans" in args:
        shape = (int(args["in_chans"]),) + shape[1:]
    return shape


def _load_callable(name: str, how: str) -> Callable[..., nn.Module]:
    mod_name, _, attr = name.partition(":")
    if not mod_name or not attr:
        raise SlimkitError(f"model source {name!r} must look like package.module:callable")
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:  # ImportError, or anything the user's module raises while importing
        raise SlimkitError(f"cannot import module {mod_name!r} of {how} {name!r}: {type(exc).__name__}: {one_line(exc, 200)}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SlimkitError(f"module {mod_name!r} has no attribute {attr!r} ({how} {name!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SlimkitError(f"{how} {name!r} is a {type(obj).__name__}, not a function or class returning an nn.Module")
    return obj


def _suggest(name: str) -> str:
    pool = list(_REGISTRY) + list(_tv_names()) + list(_plugins())
    if name.startswith(TIMM_PREFIX):
        try:
            import timm

            pool = [TIMM_PREFIX + n for n in timm.list_models()]
        except ImportError:
            pass
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else "see `slimkit models`"
    return f"unknown model {name!r}; {hint} (sources: built-in names, torchvision names, timm/NAME, package.module:callable)"


@dataclasses.dataclass(frozen=True)
class _Source:
    """A resolved model source: how to build it, what it takes and what input it reads."""

    name: str
    kind: str
    factory: Callable[..., nn.Module]
    params: tuple[str, ...] | None  # constructor arguments, None when unknown (**kwargs)
    defaults: dict[str, Any]  # arguments slimkit fills in (e.g. num_classes)
    shape: Callable[[dict[str, Any]], tuple[int, ...]]


def _source(name: str) -> _Source:
    if not isinstance(name, str) or not name:
        raise SlimkitError(f"model name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        e = _REGISTRY[name]
        sig = inspect.signature(e.factory)
        return _Source(name, "builtin", e.factory, tuple(sig.parameters), {}, e.input_shape)
    if name.startswith(TIMM_PREFIX):
        timm = _timm()
        arch = name[len(TIMM_PREFIX):]
        if not timm.is_model(arch):
            raise SlimkitError(_suggest(name))

        def build(**kw):
            return timm.create_model(arch, **kw)

        return _Source(name, "timm", build, None, {"num_classes": 1000},
                       lambda a: _timm_input_shape(name, a))
    if is_import_path(name):
        fn = _load_callable(name, "--arch")
        return _Source(name, "import", fn, _params_of(fn), {}, lambda a: (3, 224, 224))
    if name in _plugins():
        fn = _load_callable(_plugins()[name].value, f"plugin {name!r} ({PLUGIN_GROUP} entry point)")
        return _Source(name, "plugin", fn, _params_of(fn), {}, lambda a: (3, 224, 224))
    if name in _tv_names():
        import torchvision

        builder = torchvision.models.get_model_builder(name)

        def build(**kw):
            return builder(weights=None, **kw)

        return _Source(name, "torchvision", build, None, {"num_classes": 1000},
                       lambda a: _tv_input_shape(name, a))
    raise SlimkitError(_suggest(name))


def _params_of(fn: Callable) -> tuple[str, ...] | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return tuple(p for p, v in sig.parameters.items() if v.kind is not v.VAR_POSITIONAL)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise SlimkitError(_suggest(name))
    return _REGISTRY[name]


def model_signature(name: str) -> str:
    """``name(arg=default, ...)``: what a model source takes, for `slimkit models` and error messages."""
    src = _source(name)
    if src.kind == "torchvision":
        cls = _tv_class(name)
        if cls is None:
            return f"{name}(num_classes=1000, ...)"
        # the builder fixes the architecture (block, layers, ...): show what a user may still set
        params = [(k, v.default) for k, v in inspect.signature(cls.__init__).parameters.items()
                  if k != "self" and v.default is not inspect.Parameter.empty
                  and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY) and not callable(v.default)]
        return f"{name}(" + ", ".join(f"{k}={d!r}" for k, d in params) + ")"
    if src.kind == "timm":
        return f"{name}(num_classes=1000, in_chans=3, ...)"
    sig = inspect.signature(src.factory)
    return f"{name}(" + ", ".join(f"{k}={v.default!r}" if v.default is not inspect.Parameter.empty else k
                                  for k, v in sig.parameters.items()) + ")"


def model_params(name: str) -> list[str]:
    """Constructor arguments a model source takes (e.g. to know whether it has ``in_chans``).

    For timm, ``num_classes`` and ``in_chans``; for torchvision, its model class's arguments.
    """
    src = _source(name)
    if src.kind == "timm":
        return ["num_classes", "in_chans"]
    if src.kind == "torchvision" and src.params is None:
        return ["num_classes"]
    return list(src.params or ())


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


def _args(src: _Source, kwargs: dict[str, Any]) -> dict[str, Any]:
    if src.kind == "builtin":
        return _bind(src.name, kwargs)
    if src.params is not None:
        unknown = sorted(set(kwargs) - set(src.params))
        if unknown:
            raise SlimkitError(f"model {src.name!r} takes no argument {', '.join(unknown)}; "
                               f"it takes: {', '.join(src.params) or 'no arguments'}")
    return {**src.defaults, **kwargs}


def _check_shape(shape: Any) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise SlimkitError(f"input shape must be C,H,W integers, got {shape!r}") from exc
    if len(out) != 3 or min(out) < 1:
        raise SlimkitError(f"input shape must be three positive integers C,H,W, got {list(out)}")
    return out


def input_shape_of(name: str, input_shape: tuple[int, ...] | None = None, **kwargs: Any) -> tuple[int, ...]:
    """The (C, H, W) input a model built with ``kwargs`` takes (for registry nets, without building it);
    ``input_shape``, as ``create_model`` takes it, overrides the source's default."""
    if input_shape is not None:
        return _check_shape(input_shape)
    src = _source(name)
    return tuple(src.shape(_args(src, kwargs)))


def create_model(name: str, *, input_shape: tuple[int, ...] | None = None, pretrained: bool = False,
                 **kwargs: Any) -> nn.Module:
    """Build a model source with random weights, in eval mode, with its ModelSpec attached.

    ``input_shape`` (C, H, W) overrides the source's default input (timm: its pretrained config;
    torchvision: 3x224x224, 3x299x299 for inception_v3; the user's own callable: 3x224x224).
    ``pretrained`` passes through to torchvision/timm (it downloads weights; never used in tests).
    """
    src = _source(name)
    args = _args(src, kwargs)
    if "num_classes" in args and (not isinstance(args["num_classes"], int) or args["num_classes"] < 1):
        raise SlimkitError(f"num_classes must be a positive integer, got {args['num_classes']!r}")
    if pretrained and src.kind not in ("torchvision", "timm"):
        raise SlimkitError(f"--pretrained is for torchvision and timm models; {name!r} is a {src.kind} model")
    build = dict(args)
    if pretrained and src.kind == "timm":
        build["pretrained"] = True
    try:
        if pretrained and src.kind == "torchvision":
            import torchvision

            model = torchvision.models.get_model(name, weights="DEFAULT", **build)
        else:
            model = src.factory(**build)
    except SlimkitError:
        raise
    except Exception as exc:  # the constructor rejected its arguments (TypeError, ValueError, ...)
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items()) or "no arguments"
        raise SlimkitError(f"model {name!r} could not be built with {shown}: {type(exc).__name__}: {one_line(exc, 200)}") from exc
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"{name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    shape = _check_shape(input_shape) if input_shape is not None else tuple(src.shape(args))
    model.slimkit_spec = ModelSpec(name, args, shape)
    return model.eval()


def list_sources(filter: str | None = None, timm_models: bool = True) -> list[tuple[str, str]]:
    """(name, kind) of every model source slimkit can name, optionally those containing ``filter``."""
    out = [(n, "builtin") for n in list_models()]
    out += [(n, "torchvision") for n in _tv_names() if n not in _REGISTRY]
    out += [(n, "plugin") for n in sorted(_plugins())]
    if timm_models:
        try:
            import timm

            out += [(TIMM_PREFIX + n, "timm") for n in timm.list_models()]
        except ImportError:
            pass
    if filter:
        out = [(n, k) for n, k in out if filter.lower() in n.lower()]
    return out


def run_at(model: nn.Module, input_shape: Sequence[int] | None) -> nn.Module:
    """Record ``input_shape`` (C, H, W) as the input ``model`` is traced, verified and exported at (what
    --input-shape means in every verb, a slimkit checkpoint's recorded input included); None keeps it."""
    spec = spec_of(model)
    if input_shape is not None and tuple(spec.input_shape) != tuple(input_shape):
        model.slimkit_spec = dataclasses.replace(spec, input_shape=tuple(int(s) for s in input_shape))
    return model


def spec_of(model: nn.Module) -> ModelSpec:
    spec = getattr(model, "slimkit_spec", None)
    if spec is None:
        raise SlimkitError(
            "this model was not created by slimkit.create_model and carries no ModelSpec; "
            "build it with slimkit.create_model(name, ...) or load it with slimkit.load(path)"
        )
    return spec


# --- torchvision's reference classifiers: the set the tests and benchmarks use throughout -----------
# They are built through the torchvision source like any other torchvision name; listing them here
# only keeps `list_models("torchvision")` (the short list) meaningful.
_TV_CORE = ("resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn", "mobilenet_v2", "densenet121")


def zoo_outcomes() -> dict[str, str]:
    """Model name -> "yes" or "refused: why", as the zoo test last recorded them (benchmarks/zoo.py)."""
    import json
    from pathlib import Path

    path = Path(__file__).parent.parent / "_data" / "zoo.json"
    return json.loads(path.read_text()) if path.exists() else {}
