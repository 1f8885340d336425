"""Train a ResNet on labelled radiographs: augmentation, balanced sampling, checkpoints.

The model sees exactly what the running system feeds it: the uint8 model input built from the
stored preview (pipeline.training.datasets.load_one), scaled by x/255, normalised with the weights' mean
and std, greyscale replicated to three channels. Randomness comes from (seed, epoch), so a run
resumed from an epoch checkpoint draws the same batches as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

log = logging.getLogger(__name__)


# augment_fn(uint8 N x S x S, generator, lung masks or None) -> (N x 1 x S x S in [0, 1], masks)
Augment = Callable[
    [torch.Tensor, torch.Generator, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]
]
# loss_fn(model, x, rows of the batch, the augmented lung masks or None) -> loss
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def augment(
    x: torch.Tensor,
    gen: torch.Generator,
    rotate_deg: float = 7.0,
    scale: tuple[float, float] = (0.9, 1.1),
    shift: float = 0.05,
    brightness: float = 0.1,
    contrast: float = 0.15,
    masks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Randomly rotate, scale, shift and change brightness/contrast of uint8 N x S x S images.

    Returns the N x 1 x S x S images in [0, 1] and, when ``masks`` (N x S x S, the lungs on
    each input) are given, the same geometry applied to them (N x 1 x S x S floats).
    """
    n = x.shape[0]
    x = x.float().div(255.0).unsqueeze(1)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen) * 2 - 1

    angle = uniform(n) * math.radians(rotate_deg)
    zoom = scale[0] + torch.rand(n, generator=gen) * (scale[1] - scale[0])
    tx, ty = uniform(n) * 2 * shift, uniform(n) * 2 * shift
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    warped = None
    if masks is not None:
        warped = F.grid_sample(
            masks.float().unsqueeze(1),
            grid,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
    mean = x.mean(dim=(2, 3), keepdim=True)
    c = 1 + uniform(n, 1, 1, 1) * contrast
    b = uniform(n, 1, 1, 1) * brightness
    return ((x - mean) * c + mean + b).clamp(0.0, 1.0), warped


def erase_source_cues(
    x01: torch.Tensor,
    gen: torch.Generator,
    low_res: tuple[int, int] = (32, 96),
    p_low_res: float = 0.5,
    gamma: float = 0.35,
    noise: float = 0.03,
    p_jpeg: float = 0.3,
    jpeg_quality: tuple[int, int] = (30, 90),
) -> torch.Tensor:
    """Randomise what tells one source from another: resolution, JPEG, gamma and noise.

    x01 is N x 1 x S x S in [0, 1]. Each image, independently: with p_low_res, down-sampled to
    a side drawn from low_res and up-sampled back (a 64-px source is then not told by its blur);
    a gamma of exp(U(-gamma, gamma)); Gaussian noise of a standard deviation up to ``noise``;
    with p_jpeg, a JPEG round trip at a quality drawn from jpeg_quality. Seeded by gen.
    """
    import cv2

    n, _, h, w = x01.shape
    out = x01.clone()
    side = torch.randint(low_res[0], low_res[1] + 1, (n,), generator=gen)
    low = torch.rand(n, generator=gen) < p_low_res
    for i in torch.nonzero(low).flatten().tolist():
        s = min(int(side[i]), h)
        small = F.interpolate(out[i : i + 1], size=(s, s), mode="area")
        out[i : i + 1] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    g = torch.exp((torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * gamma)
    out = out.clamp(1e-4, 1.0) ** g
    sd = torch.rand(n, 1, 1, 1, generator=gen) * noise
    out = out + torch.randn(out.shape, generator=gen) * sd
    out = out.clamp(0.0, 1.0)
    jpeg = torch.rand(n, generator=gen) < p_jpeg
    quality = torch.randint(jpeg_quality[0], jpeg_quality[1] + 1, (n,), generator=gen)
    for i in torch.nonzero(jpeg).flatten().tolist():
        img = (out[i, 0].numpy() * 255.0).round().astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality[i])])
        back = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if ok else None
        if back is not None:
            out[i, 0] = torch.from_numpy(back.astype(np.float32) / 255.0)
    return out


def augment_basic(
    x: torch.Tensor, gen: torch.Generator, masks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The geometric and intensity augmentation alone (``augment`` with its defaults)."""
    return augment(x, gen, masks=masks)


def augment_sources(
    x: torch.Tensor, gen: torch.Generator, masks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The geometric and intensity augmentation, then erase_source_cues."""
    out, warped = augment(x, gen, scale=(0.85, 1.15), shift=0.06, masks=masks)
    return erase_source_cues(out, gen), warped


def feature_maps(model: Any, x: torch.Tensor) -> torch.Tensor:
    """A torchvision ResNet's layer4 feature maps (N x K x h x w)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def cam_outside_lungs(cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The share of each CAM's absolute evidence that lies outside the lungs (N), in [0, 1].

    ``cams`` are N x h x w (fc row · layer4 features, before any ReLU); ``masks`` N x 1 x S x S
    in [0, 1], the lungs on the input, reduced to the CAM grid by area. A CAM with no evidence
    counts 0.
    """
    h, w = cams.shape[-2:]
    grid = F.adaptive_avg_pool2d(masks, (int(h), int(w))).squeeze(1).clamp(0.0, 1.0)
    mass = cams.abs()
    total = mass.sum(dim=(1, 2))
    return (mass * (1.0 - grid)).sum(dim=(1, 2)) / total.clamp_min(1e-6)


class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient times -weight backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.weight * grad, None


def pooled_features(model: Any, x: torch.Tensor) -> torch.Tensor:
    """A torchvision ResNet's globally pooled penultimate features (N x K)."""
    return torch.flatten(model.avgpool(feature_maps(model, x)), 1)


def balanced_cells(cells: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw size indices with replacement, each cell (e.g. source x label) equally likely."""
    return balanced_indices(cells, size, rng)


def to_model(x01: torch.Tensor, mean: float, std: float, device: torch.device) -> torch.Tensor:
    """Normalise N x 1 x S x S images in [0, 1] and replicate them to three channels."""
    x = ((x01 - mean) / std).expand(-1, 3, -1, -1).to(device)
    return x.contiguous(memory_format=torch.channels_last)


def balanced_indices(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw size indices with replacement, each class equally likely."""
    _, labels = np.unique(labels, return_inverse=True)
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    return rng.choice(len(labels), size=size, replace=True, p=weights / weights.sum())


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    order: np.ndarray,
    batch_size: int,
    gen: torch.Generator,
    norm: tuple[float, float],
    progress: tqdm | None = None,
    augment_fn: Augment = augment_basic,
    amp: str = "off",
    loss_fn: LossFn | None = None,
    alt_images: torch.Tensor | None = None,
    alt_share: float = 0.0,
    masks: torch.Tensor | None = None,
) -> list[float]:
    """Run one pass over images[order] in batches; return the loss of every step.

    ``amp="bf16"`` runs the forward pass under bfloat16 autocast (mixed precision: the weights,
    gradients and optimizer state stay float32). Fast on GPUs and on CPUs with AMX; on a CPU
    without it, bf16 is many times slower than float32.

    ``augment_fn(batch, gen, masks)`` returns the N x 1 x S x S batch in [0, 1] and the masks
    (``masks[idx]``, the lungs on each input, or None) under the same geometry.

    ``loss_fn(model, x, idx, masks)`` computes the loss of the batch of rows ``idx``; by
    default the cross-entropy of ``model(x)`` against ``labels[idx]``.

    With ``alt_images`` (the same films, another preprocessing), each image of a batch is taken
    from it with probability ``alt_share``.
    """
    device = next(model.parameters()).device
    model.train()
    losses = []
    for start in range(0, len(order), batch_size):
        idx = torch.from_numpy(order[start : start + batch_size])
        if len(idx) < 2:  # BatchNorm cannot train on a single image
            continue
        batch = images[idx]
        if alt_images is not None and alt_share > 0:
            swap = torch.rand(len(idx), generator=gen) < alt_share
            batch = torch.where(swap.view(-1, *([1] * (batch.dim() - 1))), alt_images[idx], batch)
        x01, warped = augment_fn(batch, gen, None if masks is None else masks[idx])
        x = to_model(x01, norm[0], norm[1], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            if loss_fn is None:
                loss = F.cross_entropy(model(x).float(), labels[idx].to(device))
            else:
                loss = loss_fn(model, x, idx, None if warped is None else warped.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        if progress is not None:  # a tqdm bar on stderr
            progress.set_postfix_str(f"loss {np.mean(losses[-20:]):.3f}", refresh=False)
            progress.update(len(idx))
    return losses


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module, images: torch.Tensor, norm: tuple[float, float], batch_size: int = 64
) -> np.ndarray:
    """Return N x C logits for uint8 N x S x S images, no augmentation."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].float().div(255.0).unsqueeze(1)
        out.append(model(to_model(x, norm[0], norm[1], device)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def load_init(model: torch.nn.Module, path: Path) -> None:
    """Start from a torchvision-compatible state dict; a head of another shape is left fresh."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    own = model.state_dict()
    usable = {k: v.float() for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    log.info("initialised %d of %d tensors from %s", len(usable), len(own), path.name)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a resumable checkpoint atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint."""
    return dict(torch.load(path, map_location="cpu", weights_only=True))
