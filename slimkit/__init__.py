"""slimkit: make trained networks physically smaller and faster, and prove it.

``import slimkit`` is cheap: torch, torchvision and torch-pruning load on first use of a
name below, and onnx/onnxruntime only inside the functions that export or benchmark.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "SlimkitError": "slimkit.errors",
    "save": "slimkit.checkpoint",
    "load": "slimkit.checkpoint",
    "read": "slimkit.checkpoint",
    "create_model": "slimkit.models",
    "list_models": "slimkit.models",
    "register_model": "slimkit.models",
    "KeepPlan": "slimkit.plan",
    "kels_plan": "slimkit.plan",
    "plan_masks": "slimkit.plan",
    "wels_masks": "slimkit.plan",
    "plan_from_masks": "slimkit.plan",
    "apply_masks": "slimkit.plan",
    "ChannelGraph": "slimkit.graph",
    "apply_plan": "slimkit.surgery",
    "cut": "slimkit.surgery",
    "extract": "slimkit.extract",
    "count_params": "slimkit.cost",
    "count_macs": "slimkit.cost",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimkit' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
