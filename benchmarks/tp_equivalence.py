"""Does slimkit's surgery build the same network torch-pruning's own pruner builds? (no timing)

    .venv/bin/python benchmarks/tp_equivalence.py

For each architecture and split rate, the KELS fit hypothesis cut by slimkit and the network
produced by torch-pruning's MagnitudePruner at the same channel ratio are exported to ONNX; the
graphs are compared node by node (op type, attributes) and initializer by initializer (shape).
Identical graphs run the same kernels, so any latency gap between them is measurement noise.
Writes benchmarks/results/tp_equivalence.md.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import tp_magnitude, widths  # noqa: E402

import slimkit  # noqa: E402
from slimkit.core.graph import ChannelGraph  # noqa: E402
from slimkit.core.plan import kels_plan  # noqa: E402
from slimkit.deploy.export import to_verified_onnx  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def signature(data: bytes):
    g = onnx.load_from_string(data).graph
    nodes = [(n.op_type, tuple(sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)))
             for n in g.node]
    inits = [tuple(i.dims) for i in g.initializer]
    return nodes, sorted(inits)


def main() -> None:
    shape = (3, 224, 224)
    lines = ["# slimkit surgery vs torch-pruning MagnitudePruner: same network?", "",
             "Reproduce: `.venv/bin/python benchmarks/tp_equivalence.py`.", "",
             "| arch | sr | same widths | same ONNX ops | same initializer shapes | nodes |", "|---|---:|:---:|:---:|:---:|---:|"]
    for arch in ("resnet18", "resnet50", "mobilenet_v2"):
        torch.manual_seed(0)
        dense = slimkit.create_model(arch, num_classes=1000)
        for sr in (0.5, 0.8):
            slim = slimkit.apply_plan(dense, kels_plan(ChannelGraph(copy.deepcopy(dense), shape), sr))
            tpm = tp_magnitude(dense, sr, shape)
            a, b = signature(to_verified_onnx(slim, shape).data), signature(to_verified_onnx(tpm, shape).data)
            row = (arch, sr, widths(slim) == widths(tpm), a[0] == b[0], a[1] == b[1], len(a[0]))
            print(row, flush=True)
            lines.append("| {} | {} | {} | {} | {} | {} |".format(*[("yes" if v is True else "no" if v is False else v) for v in row]))
    if any("| no |" in ln for ln in lines):
        lines += ["", "Where widths differ, torch-pruning keeps floor(sr·C) channels and KELS keeps ceil(sr·C) "
                  "(e.g. 51 vs 52 of 64 at sr 0.8): one channel apart, so the graphs differ in shapes (and, for "
                  "depthwise convs, in their group attribute) but not in structure."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tp_equivalence.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
