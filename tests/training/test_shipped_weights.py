"""The shipped weights: trained, ordered thresholds, the model card's numbers, a thorax 8x8 CAM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.classifier.network import Classifier

SHIPPED = Path(__file__).resolve().parents[2] / "weights" / "cxr-resnet18.pt"


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped weights yet")
def test_shipped_weights_are_trained_and_ordered() -> None:
    meta = torch.load(SHIPPED, weights_only=True)["meta"]
    t = meta["thresholds"]
    assert meta["trained"] is True and t["routine"] < t["urgent"] < t["critical"]
    assert meta["metrics"]["validation"]["sensitivity_abnormal"] >= 0.95
    # The model card's numbers are the file's own: recorded by `evaluate --record`.
    assert {"paediatric_test", "adult_holdout", "nih_holdout", "loso"} <= set(meta["metrics"])
    assert meta["metrics"]["adult_holdout"]["n"] == 1006
    # Leave-one-source-out, the headline: a model per held-out source, scored on all of it.
    loso = meta["metrics"]["loso"]
    assert sorted(loso["sources"]) == [
        "covid19-radiography",
        "kaggle-pneumonia",
        "nih-cxr14-sample",
    ]
    assert [v["n"] for v in loso["sources"].values()] == [5400, 5840, 904]
    aucs = [v["auc_abnormal"] for v in loso["sources"].values()]
    assert loso["worst_auc"] == min(aucs) and abs(loso["mean_auc"] - sum(aucs) / 3) < 1e-9
    assert set(meta["training_data"]["sources"]) == set(loso["sources"])  # the final sees all


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped weights yet")
def test_shipped_model_reads_the_thorax_at_128_px_and_maps_an_8x8_cam() -> None:

    clf = Classifier(SHIPPED, "cpu", 1)
    assert clf.input_size == 128 and clf.trained and clf.preprocess == "thorax"
    assert clf.head == "abnormal" and clf.classes == ["normal", "pneumonia", "covid19", "other"]
    x = np.random.default_rng(0).integers(0, 256, (3, 128, 128), dtype=np.uint8)
    out = clf.predict(x)
    assert out.cams.shape == (3, 8, 8) and out.cams.dtype == np.float16
    assert np.allclose(out.probabilities.sum(axis=1), 1.0, atol=1e-5)
