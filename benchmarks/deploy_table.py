"""The deployment table (`slimkit compare --precision fp32,fp16,int8`) on two networks, plus the two
measurements behind the INT8 defaults.

    .venv/bin/python benchmarks/deploy_table.py --case resnet18 [--runs 40]
    .venv/bin/python benchmarks/deploy_table.py --case digits [--runs 100]

resnet18: random weights (latency only), 3x224x224, split rate 0.5, batch 1 and 8, INT8 calibrated on
64 random-normal images (a .npy array: the weights are random, so no image set is more meaningful).
Also times the slim network quantized three ways (U8S8, S8S8, U8S8 with reduce_range) interleaved,
the measurement behind slimkit's x86 choice. Writes deploy_resnet18.* and int8_settings.*.

digits: the bundled KE network models/digits_resnet20_ke.pt, split rate 0.5, accuracy on the digits
test split, INT8 calibrated on the training split. Also INT8 accuracy of the slim network against
the calibration-set size (seeds 0-4), the measurement behind the 16-image minimum. Writes
deploy_digits.* and int8_digits.*.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

import slimkit
from slimkit.deploy.compare import compare
from slimkit.deploy.runners import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    import onnxruntime as ort

    flags = subprocess.run("grep -o 'avx512_vnni\\|avx_vnni\\|amx_int8' /proc/cpuinfo | sort -u", shell=True,
                           capture_output=True, text=True).stdout.split()
    return (f"{cpu_name()} ({', '.join(flags) or 'no VNNI/AMX flags'}; `grep -o 'avx512_vnni\\|avx_vnni\\|amx_int8' "
            f"/proc/cpuinfo | sort -u`), {torch.get_num_threads()} threads, onnxruntime {ort.__version__}, "
            f"torch {torch.__version__}, Python {platform.python_version()}; the machine is shared with other "
            "engineers' jobs, so absolute times are noisy: ratios come from one interleaved run")


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "n/a"


def save_table(rep, tag: str, out: Path, command: str, extra: str = "", load: str = "") -> None:
    head = (f"# Deployment table: {tag}\n\n{machine()}. Load average (1 min) at start / end: {load} / "
            f"{load_average()}.\n\nReproduce: `{command}`\n\n{extra}")
    (RESULTS / f"deploy_{tag}.md").write_text(head + rep.markdown() + "\n")
    (RESULTS / f"deploy_{tag}.json").write_text(json.dumps(rep.to_json(), indent=2) + "\n")
    shutil.copy(out / "compare.png", RESULTS / f"deploy_{tag}.png")


def resnet18(args, tmp: Path) -> None:
    from slimkit.deploy.bench import bench
    from slimkit.deploy.export import to_verified_onnx
    from slimkit.deploy.quantize import Int8Settings, choose_int8_settings, cpu_flags, quantize_model
    from slimkit.deploy.runners import check_trial, onnx_runner
    from slimkit.models.checkpoint import read
    from slimkit.models.hypothesis import fit_hypothesis

    torch.manual_seed(0)
    ck = slimkit.save(slimkit.create_model("resnet18", num_classes=1000), tmp / "resnet18.pt")
    calib = tmp / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((64, 3, 224, 224)).astype(np.float32))
    load = load_average()
    rep = compare(ck, 0.5, batches=[1, 8], precision="fp32,fp16,int8", calib=str(calib), calib_size=64,
                  warmup=args.warmup, runs=args.runs, out=tmp / "c")
    rep.source = "resnet18, random weights (torch.manual_seed(0)), 1000 classes"
    rep.int8["calibration"]["source"] = "64 random-normal images (a .npy array)"
    rows = {r["name"]: r for r in rep.rows}
    b8 = {n: r["latency"][-1]["p50_ms"] for n, r in rows.items()}
    goal = (f"Goal (issue 20): slim int8 at batch 8 >= 1.5x faster than slim fp32 and >= 5x faster than dense fp32. "
            f"Measured: {b8['slim fp32'] / b8['slim int8']:.2f}x and {b8['dense fp32'] / b8['slim int8']:.2f}x "
            f"({'met' if b8['slim fp32'] / b8['slim int8'] >= 1.5 and b8['dense fp32'] / b8['slim int8'] >= 5 else 'not met'}). "
            "Random weights: no accuracy; INT8 calibrated on 64 random-normal images (a .npy array).\n\n")
    save_table(rep, "resnet18", tmp / "c", f".venv/bin/python benchmarks/deploy_table.py --case resnet18 --runs {args.runs}",
               goal, load)

    # the settings behind slimkit's x86 choice: the same slim fp32 graph quantized three ways, interleaved
    fh = fit_hypothesis(read(ck), 0.5)
    fp32 = to_verified_onnx(fh.slim, (3, 224, 224)).data
    x = np.load(calib)
    chosen = choose_int8_settings(*cpu_flags())
    variants = {"U8S8": Int8Settings("uint8"), "S8S8": Int8Settings("int8"),
                "U8S8 reduce_range": Int8Settings("uint8", reduce_range=True)}
    (tmp / "slim_fp32.onnx").write_bytes(fp32)
    runners = [check_trial(onnx_runner(tmp / "slim_fp32.onnx", "cpu", None, None, [1, 8]))]
    runners[0].name = "slim fp32"
    for name, s in variants.items():
        path = tmp / f"slim_{name.replace(' ', '_')}.onnx"
        path.write_bytes(quantize_model(fp32, x, s))
        r = check_trial(onnx_runner(path, "cpu", None, None, [1, 8]))
        r.name = f"slim int8 {name}"
        runners.append(r)
    res = bench(runners, [1, 8], warmup=args.warmup, runs=args.runs)
    by = {(r.model, r.batch): r.p50_ms for r in res}
    lines = ["# INT8 settings on this CPU: resnet18 slim (sr 0.5), 3x224x224, QDQ per-channel, MinMax on 64 "
             "random-normal images\n", f"{machine()}.\n",
             f"Reproduce: `.venv/bin/python benchmarks/deploy_table.py --case resnet18 --runs {args.runs}`\n",
             f"slimkit's choice here: {chosen.short()} ({chosen.why}).\n",
             "| file | p50 ms batch 1 | p50 ms batch 8 | speed-up over slim fp32, batch 1 | batch 8 |",
             "|---|---:|---:|---:|---:|"]
    for r in runners:
        lines.append(f"| {r.name} | {by[(r.name, 1)]:.2f} | {by[(r.name, 8)]:.2f} | "
                     f"{by[('slim fp32', 1)] / by[(r.name, 1)]:.2f}x | {by[('slim fp32', 8)] / by[(r.name, 8)]:.2f}x |")
    lines.append(f"\n{args.runs} timed runs per file and batch, interleaved in one run; load average (1 min) at "
                 f"the end {load_average()}.")
    (RESULTS / "int8_settings.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "int8_settings.json").write_text(json.dumps([r.__dict__ for r in res], indent=2) + "\n")


def digits(args, tmp: Path) -> None:
    from slimkit.data.digits import digits as digits_set
    from slimkit.deploy.export import to_verified_onnx
    from slimkit.deploy.quantize import choose_int8_settings, cpu_flags, ort_accuracy, quantize_model
    from slimkit.models.checkpoint import read
    from slimkit.models.hypothesis import fit_hypothesis

    ck = ROOT / "models" / "digits_resnet20_ke.pt"
    load = load_average()
    rep = compare(ck, 0.5, data="digits", batches=[1, 8], precision="fp32,fp16,int8", calib="digits",
                  max_drop=1.0, warmup=args.warmup, runs=args.runs, out=tmp / "c")
    rows = {r["name"]: r for r in rep.rows}
    drop = 100 * (rows["slim fp32"]["accuracy"] - rows["slim int8"]["accuracy"])
    goal = (f"Goal (issue 20): slim int8 within 1 point of slim fp32 accuracy. Measured: {drop:+.2f} points "
            f"({'met' if drop <= 1 else 'not met'}). The table's pick: **{rep.pick}**.\n\n")
    rep.source = "models/digits_resnet20_ke.pt"
    save_table(rep, "digits", tmp / "c",
               f".venv/bin/python benchmarks/deploy_table.py --case digits --runs {args.runs}", goal, load)

    # INT8 accuracy against the number of calibration images: why slimkit asks for at least 16
    fh = fit_hypothesis(read(ck), 0.5)
    shape = (1, 16, 16)
    fp32 = to_verified_onnx(fh.slim, shape).data
    test = digits_set("test", image_size=16)
    train = digits_set("train", image_size=16).tensors[0].numpy()
    base = ort_accuracy(fp32, test)
    settings = choose_int8_settings(*cpu_flags())
    rows_out = []
    for n in (2, 4, 8, 16, 32, 64, 256):
        accs = []
        for seed in range(5):
            pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n].numpy()
            accs.append(ort_accuracy(quantize_model(fp32, train[pick], settings), test))
        rows_out.append({"images": n, "int8_accuracy": accs, "fp32_accuracy": base})
    lines = ["# INT8 accuracy against the calibration-set size: digits KE network, slim (sr 0.5)\n",
             f"{machine()}.\n",
             f"Reproduce: `.venv/bin/python benchmarks/deploy_table.py --case digits --runs {args.runs}`\n",
             f"slim fp32 accuracy on the digits test split (n={len(test)}, ONNX Runtime CPU): {100 * base:.2f}%. "
             f"INT8 ({settings.short()}) calibrated on N training images drawn with seeds 0-4:\n",
             "| calibration images | INT8 accuracy, seeds 0-4 (%) | worst drop (points) | mean drop (points) |",
             "|---:|---|---:|---:|"]
    for r in rows_out:
        a = np.array(r["int8_accuracy"])
        lines.append(f"| {r['images']} | {', '.join(f'{100 * v:.2f}' for v in a)} | {100 * (base - a.min()):+.2f} | "
                     f"{100 * (base - a.mean()):+.2f} |")
    (RESULTS / "int8_digits.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "int8_digits.json").write_text(json.dumps(rows_out, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=("resnet18", "digits"), required=True)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (resnet18 if args.case == "resnet18" else digits)(args, Path(tmp))


if __name__ == "__main__":
    main()
