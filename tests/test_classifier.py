"""The classifier: weights format, probabilities, and CAM from the same forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.classifier import Classifier, WeightsError, create_untrained_weights
from tests.conftest import chest_like


def test_cam_equals_fc_weights_times_layer4_features(weights_file) -> None:
    clf = Classifier(weights_file, device="cpu", threads=1)
    batch = np.stack([chest_like(224, seed=s) for s in range(3)])
    out = clf.predict(batch)
    assert out.probabilities.shape == (3, 3)
    assert np.allclose(out.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert out.cams.shape == (3, 7, 7) and out.cams.dtype == np.float16

    # Reference: torchvision's own forward with a hook on layer4.
    feats = {}
    hook = clf.model.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("f", o))
    x = (
        torch.from_numpy(batch)
        .float()
        .div(255)
        .sub(0.5)
        .div(0.25)
        .unsqueeze(1)
        .expand(-1, 3, -1, -1)
    )
    with torch.inference_mode():
        logits = clf.model(x)
        idx = logits.argmax(1)
        ref = torch.einsum("nk,nkhw->nhw", clf.model.fc.weight[idx], feats["f"]).numpy()
    hook.remove()
    assert np.allclose(torch.softmax(logits, 1).numpy(), out.probabilities, atol=1e-5)
    assert np.array_equal(out.cam_index, idx.numpy())
    assert np.allclose(out.cams.astype(np.float32), ref, rtol=2e-3, atol=2e-3)


def test_weights_load_with_weights_only_and_version_is_content_hash(tmp_path) -> None:
    a = create_untrained_weights(tmp_path / "a.pt", seed=1)
    b = create_untrained_weights(tmp_path / "b.pt", seed=2)
    blob = torch.load(a, weights_only=True)
    assert blob["meta"]["classes"] == ["normal", "pneumonia", "covid19"]
    assert blob["meta"]["trained"] is False
    ca, cb = Classifier(a, "cpu"), Classifier(b, "cpu")
    assert ca.version != cb.version and ca.version.startswith("resnet18-")
    assert not ca.trained


def test_bad_weights_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        Classifier(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"something": 1}, bad)
    with pytest.raises(WeightsError, match="not a cxr-triage weights file"):
        Classifier(bad)
