"""pipeline.bench: a tiny end-to-end run; checks the JSON's shape and that times are positive, never their size."""

from __future__ import annotations

import json

from pipeline.bench import run_benchmarks


def test_run_benchmarks_writes_every_section(tmp_path):
    out = tmp_path / "nested" / "bench.json"
    lines: list[str] = []
    returned = run_benchmarks(["Nano-4"], image_size=16, batch_size=8, out=str(out), repeats=2, write=lines.append)

    assert out.exists()
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    for section in ("machine", "config", "train_step", "inference", "data", "fewshot"):
        assert section in results, section
    assert isinstance(results["machine"]["cpu_has_fast_bf16"], bool)
    assert results["machine"]["torch_version"]

    (row,) = results["train_step"]["rows"]
    assert row["variant"] == "Nano-4" and row["params"] > 0
    assert row["fp32_ms_per_step"] > 0 and row["bf16_ms_per_step"] > 0
    assert isinstance(row["bf16_over_fp32"], float) and row["bf16_over_fp32"] > 0
    assert 1 <= row["fp32_steps_timed"] <= 2 and 1 <= row["bf16_steps_timed"] <= 2

    (inference,) = results["inference"]["rows"]
    assert inference["img_per_s_per_core"] > 0 and inference["best_batch_size"] > 0

    data = results["data"]
    assert data["reader_samples_per_s"] > 0 and data["decode_only_samples_per_s"] > 0
    assert data["reader_over_decode_only"] > 0
    assert data["fraction"]["0.1"]["seconds"] > 0 and data["fraction"]["1.0"]["seconds"] > 0
    assert data["fraction"]["0.1"]["samples"] < data["fraction"]["1.0"]["samples"]

    assert [r["shots"] for r in results["fewshot"]["rows"]] == [1, 5, 10, 25]
    assert all(r["ms_per_fit"] > 0 for r in results["fewshot"]["rows"])

    text = "\n".join(lines)
    assert "bf16/fp32" in text and "img/s/core" in text and "decode-only" in text
