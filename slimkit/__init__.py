"""slimkit: make trained networks physically smaller and faster, and prove it.

``import slimkit`` is cheap: torch, torchvision and torch-pruning load on first use of a
name below, and onnx/onnxruntime only inside the functions that export or benchmark.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> "module" (same name there) or "module:name"
_EXPORTS = {
    "SlimkitError": "slimkit.core.errors",
    # networks and checkpoints
    "create_model": "slimkit.models.registry",
    "list_models": "slimkit.models.registry",
    "register_model": "slimkit.models.registry",
    "save": "slimkit.models.checkpoint",
    "load": "slimkit.models.checkpoint",
    "read": "slimkit.models.checkpoint",
    # plans and the one surgery
    "KeepPlan": "slimkit.core.plan",
    "kels_plan": "slimkit.core.plan",
    "plan_masks": "slimkit.core.plan",
    "wels_masks": "slimkit.core.plan",
    "plan_from_masks": "slimkit.core.plan",
    "apply_masks": "slimkit.core.plan",
    "ChannelGraph": "slimkit.core.graph",
    "apply_plan": "slimkit.core.surgery",
    "cut": "slimkit.core.surgery",
    "count_params": "slimkit.core.cost",
    "count_macs": "slimkit.core.cost",
    # one function per verb; each takes paths or network objects where the verb reads a network
    "extract": "slimkit.methods.ke.extract",
    "export": "slimkit.deploy.exporting:export_onnx",
    "bench": "slimkit.deploy.bench:bench_files",
    "compare": "slimkit.deploy.compare",
    "train": "slimkit.engine.train",
    "TrainRunConfig": "slimkit.engine.train",
    "TrainConfig": "slimkit.engine.loop",
    "evolve": "slimkit.methods.ke.evolve",
    "EvolveConfig": "slimkit.methods.ke.evolve",
    "merge": "slimkit.methods.merge.merging",
    "MergeConfig": "slimkit.methods.merge.merging",
    "den": "slimkit.methods.den.sequence:run_den",
    "DENConfig": "slimkit.methods.den.config",
    "prune": "slimkit.methods.routes.pruning:prune_run",
    "PruneRunConfig": "slimkit.methods.routes.pruning",
    "routes": "slimkit.methods.routes.run:run_routes",
    "RoutesConfig": "slimkit.methods.routes.run",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        module, _, attr = _EXPORTS[name].partition(":")
        value = getattr(importlib.import_module(module), attr or name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimkit' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
