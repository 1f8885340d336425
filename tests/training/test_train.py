"""Training runs: saved weights load safely and reproduce, the softmax head, resume, CAM guide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.classifier.network import Classifier
from pipeline.training import train as tr
from pipeline.training.config import TrainConfig
from pipeline.training.fit import fit
from pipeline.training.prepare import prepare
from pipeline.training.run import run
from tests.training.blobs import make_folder


def test_cam_guide_trains_and_lowers_the_evidence_outside_the_lungs(tmp_path: Path) -> None:
    """--cam-guide: the lungs are found on the train images and the loss term is applied."""
    cfg = tiny_config(tmp_path, cam_guide=1.0, input_size=64, epochs=1)
    data = prepare(cfg)
    assert data.lung_masks is not None and data.lung_masks.shape == data.images["train"].shape
    assert data.lung_masks.dtype == torch.bool
    guided: list[float] = []
    real = tr.cam_outside_lungs

    def spy(cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        out = real(cams, masks)
        guided.append(float(out.mean()))
        return out

    tr.cam_outside_lungs = spy  # type: ignore[assignment]
    try:
        fit(cfg, data)
    finally:
        tr.cam_outside_lungs = real  # type: ignore[assignment]
    found = int(data.lung_masks.flatten(1).any(1).sum())
    assert (len(guided) > 0) == (found > 0)
    assert all(0.0 <= g <= 1.0 for g in guided)
    _, meta = run(tiny_config(tmp_path, cam_guide=0.5, input_size=64, epochs=1))
    assert meta["training_data"]["config"]["cam_guide"] == 0.5


def tiny_config(tmp_path: Path, **kw: object) -> TrainConfig:
    folder = tmp_path / "data"
    if not folder.exists():
        make_folder(folder)
    base = {
        "data": [str(folder)],
        "out": str(tmp_path / "w.pt"),
        "input_size": 32,
        "epochs": 2,
        "batch_size": 8,
        "val_fraction": 0.25,
        "lr": 1e-3,
        "checkpoint": str(tmp_path / "c.ckpt"),
    }
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_saved_weights_load_safely_and_reproduce_predictions(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    model, meta = run(cfg)
    blob = torch.load(cfg.out, weights_only=True)
    assert blob["meta"]["trained"] is True and blob["meta"]["input_size"] == 32
    t = blob["meta"]["thresholds"]
    assert 0 <= t["routine"] < t["urgent"] < t["critical"] <= 1
    assert blob["state_dict"]["fc.weight"].dtype == torch.float16
    images = prepare(cfg).images["val"]
    logits = tr.predict_logits(model, images, (cfg.mean, cfg.std))
    z0 = torch.from_numpy(logits[:, 0]) / meta["temperature"]
    p_abnormal = torch.sigmoid(z0).numpy()
    clf = Classifier(Path(cfg.out), device="cpu")
    got = clf.predict(images.numpy()).probabilities
    assert clf.classes == ["normal", "pneumonia", "covid19", "other"] == meta["classes"]
    assert meta["head"] == "abnormal" and meta["preprocess"] == "thorax"
    np.testing.assert_allclose(got[:, 0], 1 - p_abnormal, atol=1e-3)  # p(normal) = 1 - sigmoid
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)  # the findings share the rest
    assert got.shape[1] == 4 and clf.predict(images.numpy()).cams.shape[1:] == (2, 2)  # 32/16


def test_softmax_head_still_trains_and_scores(tmp_path: Path) -> None:
    """The legacy head (one softmax over the classes) and the whole-film resize."""
    cfg = tiny_config(
        tmp_path,
        head="softmax",
        preprocess="resize",
        layer4_stride=2,
        balance="class",
        augment="basic",
    )
    model, meta = run(cfg)
    images = prepare(cfg).images["val"]
    logits = tr.predict_logits(model, images, (cfg.mean, cfg.std))
    expected = torch.softmax(torch.from_numpy(logits) / meta["temperature"], 1).numpy()
    got = Classifier(Path(cfg.out), device="cpu").predict(images.numpy()).probabilities
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_resume_continues_as_if_never_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path, checkpoint=str(tmp_path / "a.ckpt"))
    data = prepare(cfg)
    whole, _ = fit(cfg, data)
    real_epoch, calls = tr.train_epoch, []

    def stop_in_second_epoch(*args: object, **kw: object) -> list[float]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kw)  # type: ignore[arg-type]

    cfg2 = tiny_config(tmp_path, checkpoint=str(tmp_path / "b.ckpt"))
    monkeypatch.setattr(tr, "train_epoch", stop_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg2, data)
    monkeypatch.setattr(tr, "train_epoch", real_epoch)
    cfg2.resume = True
    resumed, history = fit(cfg2, data)
    assert [h["epoch"] for h in history] == [1, 2]
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, msg=k)
