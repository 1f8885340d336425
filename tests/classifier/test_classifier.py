"""The classifier: weights format, probabilities, and CAM from the same forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.classifier.network import Classifier, WeightsError, create_untrained_weights
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


def abnormal_head_file(tmp_path, temperature: float = 1.5):
    from pipeline.classifier.network import build_from_meta, default_meta, save_weights

    meta = default_meta() | {
        "head": "abnormal",
        "classes": ["normal", "pneumonia", "covid19", "other"],
        "findings": ["pneumonia", "covid19", "other"],
        "input_size": 128,
        "layer4_stride": 1,
        "preprocess": "thorax",
        "temperature": temperature,
    }
    torch.manual_seed(3)
    model = build_from_meta(meta)
    path = tmp_path / "abnormal.pt"
    save_weights(model, meta, path)
    return path


def test_abnormal_head_probabilities_and_cam(tmp_path) -> None:
    """p(normal) = 1 - sigmoid(z0 / T); findings share p_abnormal; CAM is z0's map, signed."""
    clf = Classifier(abnormal_head_file(tmp_path), device="cpu", threads=1)
    assert clf.preprocess == "thorax" and clf.head == "abnormal"
    batch = np.stack([chest_like(128, seed=s) for s in range(4)])
    out = clf.predict(batch)
    assert out.probabilities.shape == (4, 4) and out.cams.shape == (4, 8, 8)  # 128 / 16
    x = torch.from_numpy(batch).float().div(255).sub(0.5).div(0.25).unsqueeze(1)
    x = x.expand(-1, 3, -1, -1)
    feats = {}
    hook = clf.model.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("f", o))
    with torch.inference_mode():
        z = clf.model(x)
    hook.remove()
    p_abn = torch.sigmoid(z[:, 0] / 1.5).numpy()
    share = torch.softmax(z[:, 1:], 1).numpy() * p_abn[:, None]
    assert np.allclose(out.probabilities[:, 0], 1 - p_abn, atol=1e-5)
    assert np.allclose(out.probabilities[:, 1:], share, atol=1e-5)
    w0 = clf.model.fc.weight[0]
    ref = torch.einsum("k,nkhw->nhw", w0, feats["f"]).detach().numpy()
    sign = np.where(out.cam_index == 0, -1.0, 1.0)[:, None, None]
    assert np.allclose(out.cams.astype(np.float32), sign * ref, rtol=2e-3, atol=2e-3)
    assert clf.pooled_features(batch).shape == (4, 512)


def test_unknown_head_is_refused(tmp_path) -> None:
    path = abnormal_head_file(tmp_path)
    blob = torch.load(path, weights_only=True)
    blob["meta"]["head"] = "sigmoid-ish"
    torch.save(blob, path)
    with pytest.raises(WeightsError, match="unknown head"):
        Classifier(path, device="cpu")
