"""`cxr-triage bench --json` keeps its documented shape (a contract test, not a timing test)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


def test_bench_json_contract(settings) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli(
        [
            "bench",
            "--n",
            "8",
            "--latency-n",
            "3",
            "--rate",
            "5",
            "--json",
            "--batch-size",
            "4",
            "--batch-wait-ms",
            "100",
            "--no-runtimes",
        ],
        settings,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    # the contract, spelled out here (not read from the bench): a renamed key fails this test
    assert (
        list(doc)
        == (
            "device n model_only_img_s pipeline_img_s naive_img_s pipeline_vs_model "
            "pipeline_vs_naive latency_p50_ms latency_p95_ms runtime ingest_wait_s "
            "naive_s_same_images startup_s runtimes profile"
        ).split()
    )
    assert doc["runtime"] == "eager" and doc["runtimes"] == []  # nothing recorded for these weights
    assert doc["ingest_wait_s"] > 0 and doc["startup_s"] > 0
    # rounded to 0.01 s: an absolute tolerance too, for a fast naive run
    assert doc["naive_s_same_images"] == pytest.approx(8 / doc["naive_img_s"], rel=0.01, abs=0.006)
    assert doc["device"] == "cpu" and doc["n"] == 8
    for key in ("model_only_img_s", "pipeline_img_s", "naive_img_s"):
        assert doc[key] > 0
    assert doc["pipeline_vs_model"] == pytest.approx(
        doc["pipeline_img_s"] / doc["model_only_img_s"], rel=0.01
    )
    assert doc["pipeline_vs_naive"] == pytest.approx(
        doc["pipeline_img_s"] / doc["naive_img_s"], rel=0.01
    )
    assert 0 < doc["latency_p50_ms"] <= doc["latency_p95_ms"]
    # The profile: each stage timed in the process that ran it, per image of the timed run.
    profile = doc["profile"]
    assert profile["images"] == 8 and profile["cores"] >= 1
    for stage in ("read", "decode", "preview", "sql", "model_input", "payload", "send"):
        assert profile["ingest"][stage]["ms"] > 0, stage
    for stage in ("message", "claim", "load", "forward", "cam", "write", "cleanup", "ack"):
        assert profile["worker"][stage]["ms"] > 0, stage
    assert profile["worker"]["forward"]["cpu_ms"] > 0
    cpu = profile["cpu_ms_per_image"]
    assert all(cpu[k] > 0 for k in ("ingest", "workers", "redis"))
    assert cpu["total"] == pytest.approx(cpu["ingest"] + cpu["workers"] + cpu["redis"], abs=0.01)
    assert profile["bound_img_s"] > 0 and profile["bound_vs_model"] > 0
    assert 0 < profile["model_cpu_share"] and profile["model_cpu_ms_per_image"] > 0
