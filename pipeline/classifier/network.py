"""ResNet classifier with a class activation map from the same forward pass.

A weights file is a dict ``{"format", "state_dict", "meta"}`` loadable with
``torch.load(weights_only=True)``. ``meta`` carries the architecture, classes, input size,
normalisation, temperature, triage thresholds and whether the model was trained at all.
CAM (Zhou et al. 2016) = fc weights of a class · layer4 feature maps: no extra pass.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from pipeline.classifier.weights import FORMAT, WeightsError, file_sha256
from pipeline.profiling import STAGES

log = logging.getLogger(__name__)

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
DEFAULT_CLASSES = ("normal", "pneumonia", "covid19")
DEFAULT_THRESHOLDS = {"critical": 0.9, "urgent": 0.7, "routine": 0.4}


HEADS = ("softmax", "abnormal")


def build_model(arch: str, num_outputs: int, layer4_stride: int = 2) -> torch.nn.Module:
    """Create an untrained torchvision ResNet with a num_outputs linear head.

    ``layer4_stride=1`` keeps layer4 at layer3's resolution: a CAM grid of input/16 instead of
    input/32 (8 x 8 at 128 px), at about 1.7x the compute of the standard network.
    """
    if arch not in ARCHITECTURES:
        raise WeightsError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    if layer4_stride not in (1, 2):
        raise WeightsError(f"layer4_stride must be 1 or 2, not {layer4_stride}")
    model: Any = getattr(torchvision.models, arch)(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, num_outputs)
    if layer4_stride == 1:
        block = model.layer4[0]
        for conv in (block.conv1, getattr(block, "conv2", None)):
            if conv is not None and conv.stride == (2, 2):
                conv.stride = (1, 1)
        block.downsample[0].stride = (1, 1)
    return model


def head_outputs(meta: dict[str, Any]) -> int:
    """Width of the linear head a weights file's metadata describes."""
    if meta.get("head", "softmax") == "abnormal":
        return 1 + len(meta.get("findings", []))
    return len(meta["classes"])


def build_from_meta(meta: dict[str, Any]) -> torch.nn.Module:
    """The untrained network a weights file's metadata describes."""
    return build_model(meta["arch"], head_outputs(meta), int(meta.get("layer4_stride", 2)))


def head_probabilities(logits: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """N x len(classes) probabilities from the head's logits.

    ``softmax`` head: softmax(logits / T) over the classes. ``abnormal`` head (the triage
    output): logit 0 is abnormal vs normal, p_abnormal = sigmoid(z0 / T); the other logits
    share p_abnormal among the findings (softmax), so the classes are
    [normal, *findings] and p(normal) = 1 - p_abnormal.
    """
    t = float(meta.get("temperature", 1.0))
    if meta.get("head", "softmax") != "abnormal":
        return torch.softmax(logits / t, dim=1)
    p_abn = torch.sigmoid(logits[:, :1] / t)
    if logits.shape[1] > 1:
        share = p_abn * torch.softmax(logits[:, 1:], dim=1)
    else:
        share = p_abn
    return torch.cat([1.0 - p_abn, share], dim=1)


def default_meta(arch: str = "resnet18", classes: tuple[str, ...] = DEFAULT_CLASSES) -> dict:
    """Metadata of a model nobody has trained yet."""
    return {
        "arch": arch,
        "classes": list(classes),
        "input_size": 224,
        "mean": 0.5,
        "std": 0.25,
        "temperature": 1.0,
        "thresholds": dict(DEFAULT_THRESHOLDS),
        "trained": False,
        "description": "randomly initialised stand-in: untrained model, predictions are noise",
    }


def save_weights(model: torch.nn.Module, meta: dict[str, Any], path: Path) -> None:
    """Save an fp16 state dict with its metadata, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save({"format": FORMAT, "state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, path)


def create_untrained_weights(path: Path, arch: str = "resnet18", seed: int = 0) -> Path:
    """Write a seeded, randomly initialised weights file (a stand-in until real weights exist)."""
    torch.manual_seed(seed)
    meta = default_meta(arch)
    save_weights(build_model(arch, len(meta["classes"])), meta, path)
    return path


def choose_device(requested: str = "auto") -> torch.device:
    """Pick CUDA when asked for or available under 'auto', else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@dataclass
class BatchOutput:
    probabilities: np.ndarray  # N x C, float32
    cams: np.ndarray  # N x h x w, float16, for cam_index
    cam_index: np.ndarray  # N, the class each CAM explains (the predicted class)
    seconds: float


class Classifier:
    """A loaded model: load once per process, call ``predict`` per batch."""

    def __init__(
        self,
        weights_path: Path,
        device: str = "auto",
        threads: int = 0,
        runtime: str = "eager",
        batch_size: int = 0,
    ) -> None:
        if not weights_path.exists():
            raise WeightsError(f"weights file not found: {weights_path}")
        try:
            blob = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(f"cannot load weights {weights_path.name}: {exc}") from exc
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise WeightsError(f"{weights_path.name} is not a cxr-triage weights file")
        self.meta: dict[str, Any] = blob["meta"]
        self.classes: list[str] = list(self.meta["classes"])
        self.input_size = int(self.meta.get("input_size", 224))
        self.temperature = float(self.meta.get("temperature", 1.0))
        self.thresholds: dict[str, float] = dict(self.meta.get("thresholds", DEFAULT_THRESHOLDS))
        self.trained = bool(self.meta.get("trained", False))
        self.sha256 = file_sha256(weights_path)
        self.version = f"{self.meta['arch']}-{self.sha256[:12]}"
        self.device = choose_device(device)
        if self.device.type == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        self.head = str(self.meta.get("head", "softmax"))
        if self.head not in HEADS:
            raise WeightsError(f"{weights_path.name}: unknown head {self.head!r}")
        self.preprocess = str(self.meta.get("preprocess", "resize"))
        model = build_from_meta(self.meta)
        model.load_state_dict({k: v.float() for k, v in blob["state_dict"].items()})
        model.eval().to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.model: Any = model
        self._mean = float(np.mean(self.meta.get("mean", 0.5)))
        self._std = float(np.mean(self.meta.get("std", 0.25)))
        # The CPU forward pass may run elsewhere (pipeline.classifier.runtimes); eager is the reference.
        self.runtime = "eager"
        self._forward: Any = None
        if self.device.type == "cpu" and runtime != "eager":
            self._use_runtime(runtime, weights_path, threads, batch_size)
        log.info(
            "loaded model %s on %s (trained=%s, runtime %s)",
            self.version,
            self.device,
            self.trained,
            self.runtime,
        )

    def _use_runtime(self, requested: str, weights_path: Path, threads: int, batch: int) -> None:
        from pipeline.classifier import runtimes

        name = runtimes.resolve(requested, weights_path, self.sha256)
        if name == "eager":
            return
        try:
            self._forward = runtimes.build_forward(
                name,
                self.model,
                self.input_size,
                runtimes.onnx_dir_for(weights_path),
                self.sha256,
                threads or torch.get_num_threads(),
                pad_to=batch,
            )
            self.runtime = name
            self.predict(np.zeros((max(1, batch), self.input_size, self.input_size), np.uint8))
        except Exception as exc:  # a missing package, a failed export: the reference still runs
            self._forward, self.runtime = None, "eager"
            log.warning("runtime %s unavailable, falling back to eager PyTorch: %s", name, exc)

    def cam_class(self, index: int) -> str:
        """What the CAM of a prediction of class ``index`` shows, in words for the viewer.

        The abnormal head's map is that of the abnormal-vs-normal logit, whatever the finding.
        """
        if self.head == "abnormal":
            return "normal" if index == 0 else "abnormal"
        return self.classes[index]

    @property
    def normal_index(self) -> int | None:
        return self.classes.index("normal") if "normal" in self.classes else None

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    @torch.inference_mode()
    def pooled_features(self, images: np.ndarray) -> np.ndarray:
        """The globally pooled penultimate features (N x K) of uint8 N x S x S inputs."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = x.float().div_(255.0).sub_(self._mean).div_(self._std).unsqueeze(1)
        feats = self._features(x.expand(-1, 3, -1, -1))
        return torch.flatten(self.model.avgpool(feats), 1).float().cpu().numpy()

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> BatchOutput:
        """Classify a batch of uint8 N x S x S images; CAM for each predicted class."""
        start = time.perf_counter()
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.float().div_(255.0).sub_(self._mean).div_(self._std).unsqueeze(1)
        with STAGES.time("forward", len(images)):
            feats, logits = self._network(x)
        with STAGES.time("cam", len(images)):
            return self._outputs(feats.float(), logits.float(), start)

    def _network(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network on normalised N x 1 x S x S inputs: (layer4 features, logits)."""
        if self._forward is not None:
            feats, logits = self._forward(x)
            return feats, logits
        x = x.expand(-1, 3, -1, -1)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            feats = self._features(x)
            logits = self.model.fc(torch.flatten(self.model.avgpool(feats), 1))
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # so the forward stage's time is the GPU's, not the CAM's
        return feats, logits

    def _outputs(self, feats: torch.Tensor, logits: torch.Tensor, start: float) -> BatchOutput:
        """Probabilities, the predicted class and its CAM from the network's outputs."""
        probs = head_probabilities(logits, self.meta)
        if self.head == "abnormal":
            # the call follows the operating point: abnormal from the routine threshold, then
            # the likeliest finding (an argmax over [normal, *findings] splits p_abnormal)
            flagged = (1.0 - probs[:, 0]) >= float(self.thresholds.get("routine", 0.5))
            idx = torch.where(
                flagged, 1 + probs[:, 1:].argmax(dim=1), torch.zeros_like(flagged, dtype=torch.long)
            )
        else:
            idx = probs.argmax(dim=1)
        # CAM_c(h, w) = sum_k w_{c,k} * f_k(h, w): one matmul over the batch, no second pass.
        fc = self.model.fc.weight.float()
        if self.head == "abnormal":
            # the abnormal logit's map: evidence for abnormal, or against it for a normal call
            sign = torch.where(idx == 0, -1.0, 1.0).unsqueeze(1)
            weights = sign * fc[0].unsqueeze(0)
        else:
            weights = fc[idx]  # N x K
        cams = torch.einsum("nk,nkhw->nhw", weights, feats)
        return BatchOutput(
            probabilities=probs.cpu().numpy().astype(np.float32),
            cams=cams.cpu().numpy().astype(np.float16),
            cam_index=idx.cpu().numpy(),
            seconds=time.perf_counter() - start,
        )
