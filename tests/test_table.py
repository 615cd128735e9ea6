"""The deployment table (`slimkit compare --precision ...`): files, one pick within the budget, refusals."""
from __future__ import annotations

import json

import pytest
import torch
from test_quantize import KE, ill_calibration, image_folder

from slimkit import create_model, load, save
from slimkit.data.digits import digits
from slimkit.deploy.table import parse_align, parse_precisions, pick_artefact
from slimkit.engine.evaluate import accuracy


def test_pick_is_the_fastest_within_the_budget():
    """Hand-worked: the fastest artefact (int8, 5x) loses 10 points and must not be picked."""
    rows = [
        {"name": "dense fp32", "accuracy": 0.900, "speedup": 1.0, "bytes": 100},
        {"name": "slim int8", "accuracy": 0.800, "speedup": 5.0, "bytes": 10},
        {"name": "slim fp32", "accuracy": 0.8905, "speedup": 3.0, "bytes": 40},  # 0.95 points below: inside 1.0
        {"name": "slim fp16", "accuracy": 0.8890, "speedup": 3.5, "bytes": 20},  # 1.1 points below: outside
        {"name": "dense int8", "accuracy": 0.8990, "speedup": 3.0, "bytes": 30},  # as fast as slim fp32, smaller
    ]
    assert pick_artefact(rows, 1.0)[0] == "dense int8"
    assert pick_artefact(rows, 1.2)[0] == "slim fp16"
    assert pick_artefact(rows, 10.0)[0] == "slim int8"
    assert pick_artefact(rows, 0.0)[0] == "dense fp32"  # nothing else keeps the full accuracy
    no_data = [dict(r, accuracy=None) for r in rows]
    name, why = pick_artefact(no_data, 1.0)
    assert name == "slim int8" and "latency only" in why


def test_parse_precisions_and_align():
    assert parse_precisions("int8,fp16") == ["fp32", "fp16", "int8"]  # fp32 is the reference, always there
    assert parse_align("auto") == "auto" and parse_align("16") == 16 and parse_align(None) is None
    for bad in ("fp64", "", "fp32;int8"):
        with pytest.raises(Exception, match="--precision takes"):
            parse_precisions(bad)
    for bad in ("0", "-8", "x", 1.5):
        with pytest.raises(Exception, match="--align must be a positive integer"):
            parse_align(bad)


@pytest.mark.slow
def test_table_on_the_digits_network_never_picks_an_artefact_outside_the_budget(cli, tmp_path):
    """INT8 calibrated on inputs 100x too small saturates (~10% accuracy): it is listed, never picked."""
    out = tmp_path / "t"
    r = cli("compare", KE, "--split-rate", "0.5", "--precision", "fp32,int8", "--data", "digits", "--calib",
            ill_calibration(tmp_path / "ill.npy"), "--max-drop", "0.5", "--batch", "1,4", "--runs", "3",
            "--warmup", "1", "--out", out)
    assert r.code == 0, r.err
    rep = json.loads((out / "compare.json").read_text())
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "compare.md").read_text()
    names = [row["name"] for row in rep["rows"]]
    assert names == ["dense fp32", "dense int8", "slim fp32", "slim int8"]
    test = digits("test", image_size=16)
    dense_acc = accuracy(load(KE), test)  # torch, independent of the table's ONNX Runtime runs
    ref = rep["rows"][0]
    assert ref["accuracy"] == pytest.approx(dense_acc, abs=1 / len(test)) and ref["n"] == len(test)
    floor = ref["accuracy"] - 0.005
    picks = [row for row in rep["rows"] if row["pick"]]
    assert len(picks) == 1 and picks[0]["name"] == rep["pick"] and picks[0]["accuracy"] >= floor
    for row in rep["rows"]:
        assert row["within_budget"] == (row["accuracy"] >= floor)
        if row["within_budget"]:
            assert row["speedup"] <= picks[0]["speedup"]
        if row["precision"] == "int8":
            assert row["accuracy"] < 0.5 and not row["within_budget"] and not row["pick"]
    assert md.count("(pick)") == 1 and f"**{rep['pick']}** (pick)" in md
    assert rep["int8"]["calibration"]["images"] == 16 and rep["int8"]["settings"]["format"] == "QDQ"


@pytest.mark.slow
def test_table_without_data_picks_by_latency_and_says_so(tmp_path):
    from slimkit.deploy.compare import compare

    torch.manual_seed(0)
    ck = save(create_model("cifar_resnet", depth=8, width=8, num_classes=2, image_size=16), tmp_path / "m.pt")
    calib = image_folder(tmp_path / "calib", classes=2, per_class=8)
    rep = compare(ck, 0.5, batches=[2], precision="fp32,fp16,int8", calib=str(calib), calib_size=16,
                  warmup=1, runs=2, out=tmp_path / "c", align=16)
    assert [r["name"] for r in rep.rows] == ["dense fp32", "dense fp16", "dense int8", "slim fp32", "slim fp16",
                                             "slim int8", "slim a16 fp32", "slim a16 fp16", "slim a16 int8"]
    # slim widths 4/8/16 padded to 8/16/16 (never beyond dense): more parameters than slim, fewer than dense
    p = {r["name"]: r["params"] for r in rep.rows}
    assert p["slim fp32"] < p["slim a16 fp32"] < p["dense fp32"] and rep.align["chosen"] == 16
    assert sum(r["pick"] for r in rep.rows) == 1 and "latency only" in rep.pick_why
    assert any("no --data" in n for n in rep.notes)
    assert all(r.get("accuracy") is None for r in rep.rows)
    assert (tmp_path / "c" / "compare.png").exists() and "| artefact |" in (tmp_path / "c" / "compare.md").read_text()


def test_table_refusals(cli, tmp_path):
    out = tmp_path / "c"

    def refused(*args, words=()):
        r = cli("compare", KE, "--split-rate", "0.5", "--out", out, "--runs", "1", "--warmup", "1", *args)
        assert r.code == 2 and len(r.err.strip().splitlines()) == 1, (r.code, r.err)
        for w in words:
            assert w in r.err, r.err
        assert not out.exists()

    refused("--precision", "int8", words=["--precision int8 needs --calib"])
    refused("--precision", "fp64", words=["--precision takes"])
    refused("--precision", "fp32,int8", "--calib", "digits", "--provider", "torch", words=["provider torch"])
    refused("--precision", "fp32,int8", "--calib", "digits", "--provider", "tensorrt", words=["provider tensorrt"])
    refused("--calib", "digits", words=["go with --precision"])
    refused("--precision", "fp32", "--calib", "digits", words=["go with --precision"])
    refused("--precision", "fp32", "--align", "seven", words=["--align must be"])
    refused("--precision", "int8", "--calib", "digits", "--calib-size", "4", words=["at least 16"])
