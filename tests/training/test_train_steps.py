"""Training steps: loss goes down (float32 and bf16), the alternative preprocessing's share,
augmentation with the lung masks, and the CAM pointing at the blob.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.classifier.network import Classifier, build_model
from pipeline.training import train as tr
from pipeline.training.evaluation import upsample_cam
from tests.training.blobs import blob_image


def unaugmented(
    x: torch.Tensor, g: torch.Generator, m: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """No augmentation: the uint8 films scaled to [0, 1], with a channel axis."""
    return x.float().div(255).unsqueeze(1), m


def train_on_blobs(
    model: torch.nn.Module,
    imgs: np.ndarray,
    labels: torch.Tensor,
    order: np.ndarray,
    generator: torch.Generator,
    amp: str = "off",
) -> list[float]:
    """One epoch of Adam (lr 1e-3) in batches of 16 over the blob films, unaugmented."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return tr.train_epoch(
        model,
        opt,
        None,
        torch.from_numpy(imgs),
        labels,
        order,
        16,
        generator,
        (0.5, 0.25),
        augment_fn=unaugmented,
        amp=amp,
    )


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_a_few_steps_reduce_the_loss(amp: str) -> None:
    """float32, and bf16 mixed precision (the forward in bf16; weights stay float32)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    imgs = np.stack([blob_image(rng, 32, i % 2 == 1)[0] for i in range(32)])
    labels = torch.tensor([i % 2 for i in range(32)])
    model = build_model("resnet18", 3).to(memory_format=torch.channels_last)
    order = np.tile(np.arange(32), 4)
    losses = train_on_blobs(model, imgs, labels, order, torch.Generator().manual_seed(0), amp=amp)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:2])
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_alt_images_replace_the_configured_share_of_each_batch(share: float) -> None:
    """--mix-lungs: each image comes from the other preprocessing with probability ``share``."""
    images = torch.zeros(64, 8, 8, dtype=torch.uint8)  # "thorax"
    alt = torch.full((64, 8, 8), 200, dtype=torch.uint8)  # the same films, "lungs"
    seen: list[torch.Tensor] = []

    def loss_fn(
        model: torch.nn.Module, x: torch.Tensor, idx: torch.Tensor, masks: torch.Tensor | None
    ) -> torch.Tensor:
        seen.append(x.detach().flatten(1).mean(1))
        return model(x).sum() * 0.0

    model = build_model("resnet18", 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tr.train_epoch(
        model,
        opt,
        None,
        images,
        torch.zeros(64, dtype=torch.long),
        np.tile(np.arange(64), 4),
        32,
        torch.Generator().manual_seed(1),
        (0.5, 0.25),
        augment_fn=unaugmented,
        loss_fn=loss_fn,
        alt_images=alt,
        alt_share=share,
    )
    means = torch.cat(seen)
    assert len(means) == 256
    from_alt = means > 0  # 0 -> (0 - 0.5) / 0.25 = -2; 200/255 -> about 1.1
    bright = (200 / 255 - 0.5) / 0.25
    assert bool(((means + 2.0).abs().lt(1e-4) | (means - bright).abs().lt(1e-4)).all())
    if share in (0.0, 1.0):
        assert int(from_alt.sum()) == int(share * 256)
    else:
        assert 90 <= int(from_alt.sum()) <= 166  # binomial(256, 0.5): mean 128, sd 8


def test_augment_keeps_shape_range_and_is_seeded() -> None:
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 40, 40), dtype=np.uint8))
    a = tr.augment(x, torch.Generator().manual_seed(3))[0]
    b = tr.augment(x, torch.Generator().manual_seed(3))[0]
    assert a.shape == (4, 1, 40, 40) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b)
    labels = np.array([0] * 90 + [1] * 10)
    counts = np.bincount(labels[tr.balanced_indices(labels, 2000, np.random.default_rng(0))])
    assert abs(counts[1] / 2000 - 0.5) < 0.05


def test_augment_moves_the_lung_masks_with_the_image() -> None:
    """The masks get the image's geometry; the images are the same as without masks."""
    masks = torch.zeros(6, 48, 48, dtype=torch.bool)
    masks[:, 10:38, 6:20] = True
    masks[:, 10:38, 28:42] = True
    x = masks.to(torch.uint8) * 255
    plain = tr.augment_sources(x, torch.Generator().manual_seed(5))[0]
    img, warped = tr.augment_sources(x, torch.Generator().manual_seed(5), masks)
    assert torch.equal(img, plain) and warped is not None and warped.shape == (6, 1, 48, 48)
    for i in range(6):  # the warped mask is where the warped bright image is
        inside, outside = img[i, 0][warped[i, 0] > 0.9], img[i, 0][warped[i, 0] < 0.1]
        assert float(inside.mean()) > float(outside.mean()) + 0.3
    assert not torch.equal(warped[0], warped[1])  # each film its own geometry


def test_cam_outside_lungs_is_the_share_of_evidence_outside() -> None:
    masks = torch.zeros(4, 1, 32, 32)
    masks[:, :, :, :16] = 1.0  # the left half is lung
    cams = torch.zeros(4, 4, 4)
    cams[0, :, :2] = 1.0  # all inside
    cams[1, :, 2:] = -2.0  # all outside (either sign counts)
    cams[2, :, 1:3] = 1.0  # half and half
    got = tr.cam_outside_lungs(cams, masks)  # cams[3]: no evidence
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, 0.5, 0.0]))


def test_cam_peak_falls_inside_the_blob(tmp_path: Path) -> None:
    """Train on blob/no-blob images; the shipped Classifier's CAM must point at the blob."""
    from pipeline.classifier.network import default_meta, save_weights

    size, rng = 96, np.random.default_rng(1)
    imgs = np.stack([blob_image(rng, size, i % 2 == 1)[0] for i in range(64)])
    labels = torch.tensor([i % 2 for i in range(64)])
    torch.manual_seed(0)
    model = build_model("resnet18", 2).to(memory_format=torch.channels_last)
    order = np.random.default_rng(0).permutation(np.tile(np.arange(64), 3))
    train_on_blobs(model, imgs, labels, order, torch.Generator())
    meta = default_meta() | {"classes": ["normal", "blob"], "input_size": size}
    save_weights(model, meta, tmp_path / "blob.pt")
    clf = Classifier(tmp_path / "blob.pt", device="cpu")
    tests = [blob_image(rng, size, True) for _ in range(16)]
    out = clf.predict(np.stack([t[0] for t in tests]))
    assert (out.cam_index == 1).mean() >= 0.9
    cell, radius = size / out.cams.shape[1], size // 8
    yy, xx = np.mgrid[:size, :size]
    hits = inside_hotter = 0
    for (_, (cy, cx)), cam in zip(tests, out.cams, strict=True):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        # The CAM's resolution is one layer4 cell: its peak is "in the blob" when that cell
        # overlaps the blob.
        r, c = np.unravel_index(int(np.argmax(cam)), cam.shape)
        peak_cell = np.zeros_like(disc)
        peak_cell[int(r * cell) : int((r + 1) * cell), int(c * cell) : int((c + 1) * cell)] = True
        hits += bool((disc & peak_cell).any())
        up = upsample_cam(cam.astype(np.float32), size)  # as the overlay renders it
        inside_hotter += bool(up[disc].mean() > up[~disc].mean())
    assert hits / len(tests) >= 0.8
    assert inside_hotter / len(tests) >= 0.9
