"""Every CPU runtime computes what eager float32 does; a missing one falls back to eager, saying so."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.classifier import runtimes as rt
from pipeline.classifier.network import Classifier, build_from_meta, default_meta, save_weights
from pipeline.classifier.runtime_record import (
    cpu_signature,
    read_record,
    recorded_choice,
    write_choice,
)
from tests.conftest import chest_like

SIZE = 64


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded abnormal-head ResNet-18 at 64 px with layer4 at stride 1 (a 4 x 4 CAM)."""
    torch.manual_seed(3)
    meta = {
        **default_meta(),
        "input_size": SIZE,
        "head": "abnormal",
        "layer4_stride": 1,
        "classes": ["normal", "pneumonia", "covid19"],
        "findings": ["pneumonia", "covid19"],
        "thresholds": {"critical": 0.9, "urgent": 0.7, "routine": 0.5},
    }
    model = build_from_meta(meta)
    with torch.no_grad():  # BN statistics of a trained network, not the identity of a new one
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("rt") / "small.pt"
    save_weights(model, meta, path)
    return path


def _images(n: int, seed: int) -> np.ndarray:
    import cv2

    return np.stack([cv2.resize(chest_like(256, seed + i), (SIZE, SIZE)) for i in range(n)])


@pytest.fixture(scope="module")
def int8_model(small_weights: Path) -> Path:
    ref = Classifier(small_weights, "cpu", 1)
    onnx_dir = rt.onnx_dir_for(small_weights)
    fp32 = rt.export_onnx(ref.model, SIZE, onnx_dir / f"{ref.sha256[:12]}.onnx")
    calib = _images(24, seed=100).astype(np.float32) / 255.0
    calib = ((calib - 0.5) / 0.25)[:, None]
    return rt.quantize_int8(fp32, calib, onnx_dir / f"{ref.sha256[:12]}.int8.onnx")


@pytest.mark.parametrize(
    ("runtime", "p_tol", "cam_tol"),
    [
        ("onnxruntime", 1e-4, 1e-2),
        ("openvino", 1e-4, 1e-2),
        ("compile", 1e-4, 1e-2),
        ("onnxruntime-int8", 0.05, 0.15),
        ("openvino-int8", 0.05, 0.15),
    ],
)
def test_runtime_matches_float32(
    small_weights: Path, int8_model: Path, runtime: str, p_tol: float, cam_tol: float
) -> None:
    images = _images(6, seed=0)
    ref = Classifier(small_weights, "cpu", 1).predict(images)
    clf = Classifier(small_weights, "cpu", 1, runtime, batch_size=6)
    assert clf.runtime == runtime
    out = clf.predict(images)
    assert out.probabilities.shape == ref.probabilities.shape == (6, 3)
    assert out.cams.shape == ref.cams.shape == (6, 4, 4)
    assert np.abs(out.probabilities - ref.probabilities).max() <= p_tol
    scale = float(np.abs(ref.cams.astype(np.float32)).max())
    cam_err = np.abs(out.cams.astype(np.float32) - ref.cams.astype(np.float32)).max() / scale
    assert cam_err <= cam_tol
    assert np.array_equal(out.cam_index, ref.cam_index)
    # A short batch (the worker's last one) gives the same rows as in the full batch.
    short = clf.predict(images[:2])
    assert np.abs(short.probabilities - out.probabilities[:2]).max() <= 1e-4


def test_missing_package_falls_back_to_eager_with_a_log_line(
    small_weights: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with caplog.at_level(logging.WARNING, logger="pipeline.classifier.network"):
        clf = Classifier(small_weights, "cpu", 1, "openvino")
    assert clf.runtime == "eager"
    assert (
        "runtime openvino unavailable, falling back to eager PyTorch: the openvino package "
        "is not installed"
    ) in caplog.text
    ref = Classifier(small_weights, "cpu", 1).predict(_images(2, 0))
    assert np.array_equal(clf.predict(_images(2, 0)).probabilities, ref.probabilities)


def test_missing_int8_model_falls_back_with_a_log_line(
    tmp_path: Path, small_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alone = tmp_path / "alone.pt"
    alone.write_bytes(small_weights.read_bytes())  # no .onnx folder beside this copy
    with caplog.at_level(logging.WARNING, logger="pipeline.classifier.network"):
        clf = Classifier(alone, "cpu", 1, "onnxruntime-int8")
    assert clf.runtime == "eager"
    assert "runtime onnxruntime-int8 unavailable, falling back to eager PyTorch: no int8 model" in (
        caplog.text
    )


def test_auto_uses_the_choice_recorded_for_this_cpu_and_these_weights(
    tmp_path: Path, small_weights: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(small_weights.read_bytes())
    with caplog.at_level(logging.INFO, logger="pipeline.classifier.runtimes"):
        assert Classifier(weights, "cpu", 1, "auto").runtime == "eager"
    assert "no runtime measured for these weights on this CPU" in caplog.text
    sha = Classifier(weights, "cpu", 1).sha256
    rows = [
        {"runtime": "eager", "img_s": 10.0, "passes": True},
        {"runtime": "onnxruntime", "img_s": 12.0, "passes": True},
    ]
    from bench.runtimes_bench import choose

    assert choose(rows) == "onnxruntime"
    assert choose([{**r, "passes": r["runtime"] == "eager"} for r in rows]) == "eager"
    write_choice(weights, sha, choose(rows), rows)
    assert Classifier(weights, "cpu", 1, "auto").runtime == "onnxruntime"
    assert recorded_choice(weights, "0" * 64) is None  # other weights: nothing recorded
    record = read_record(weights)
    assert list(record["cpus"]) == [cpu_signature()]
    assert record["cpus"][cpu_signature()]["runtime"] == "onnxruntime"


def test_unknown_runtime_is_refused(small_weights: Path) -> None:
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        rt.resolve("tensorrt", small_weights, "0" * 64)


def test_int8_model_is_kept_unless_requantised_and_then_old_choices_go(
    tmp_path: Path, small_weights: Path, int8_model: Path
) -> None:
    from bench.runtimes_bench import ensure_int8

    weights = tmp_path / "w.pt"
    weights.write_bytes(small_weights.read_bytes())
    sha = Classifier(weights, "cpu", 1).sha256
    fp32 = int8_model.with_name(f"{sha[:12]}.onnx")
    int8 = rt.onnx_dir_for(weights) / int8_model.name
    int8.parent.mkdir()
    int8.write_bytes(int8_model.read_bytes())
    write_choice(weights, sha, "onnxruntime-int8", [{"runtime": "onnxruntime-int8"}])
    before = int8.read_bytes()
    calib = ((_images(8, seed=7).astype(np.float32) / 255.0 - 0.5) / 0.25)[:, None]
    assert ensure_int8(weights, fp32, int8, calib) is False  # another CPU's bench: file kept
    assert int8.read_bytes() == before
    assert recorded_choice(weights, sha) == "onnxruntime-int8"
    assert ensure_int8(weights, fp32, int8, calib, requantise=True) is True
    assert int8.read_bytes() != before  # new calibration images, new scales
    assert recorded_choice(weights, sha) is None  # measured on the replaced file: dropped
    assert read_record(weights)["cpus"] == {}
