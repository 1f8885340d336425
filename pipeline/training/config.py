"""What one training run is told: a plain dataclass, importable without torch.

The CLI reads its defaults to build ``cxr-triage train``'s options; ``pipeline.training.run``
runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FINDINGS = ("pneumonia", "covid19", "other")


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    arch: str = "resnet18"
    head: str = "abnormal"  # "abnormal": binary triage logit + findings; "softmax": legacy
    findings: list[str] = field(default_factory=lambda: list(FINDINGS))
    classes: list[str] = field(default_factory=lambda: ["normal", "pneumonia", "covid19"])
    label_map: str | None = None
    input_size: int = 128
    layer4_stride: int = 1  # 1: an input/16 CAM grid (8 x 8 at 128 px)
    preprocess: str = "thorax"  # pipeline.imaging.preprocess method
    balance: str = "source-label"  # or "class"
    augment: str = "sources"  # "sources": geometry + erase_source_cues; "basic": geometry only
    adversary: float = 0.0  # weight of the source-adversarial head (0: none)
    mix_lungs: float = 0.0  # "thorax": this share of training images see the lungs only
    cam_guide: float = 0.0  # weight of the loss on CAM evidence outside the found lungs (0: none)
    holdout_source: str | None = None  # leave this source out; evaluate on it
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0
    val_fraction: float = 0.1
    holdout_fraction: float = 0.2
    epoch_size: int = 0  # images drawn per epoch; 0 = the training set's size
    device: str = "auto"
    checkpoint: str | None = None  # default: <out>.ckpt
    resume: bool = False
    init: str | None = None
    cache_dir: str | None = None
    amp: str = "off"  # "bf16": mixed-precision training (GPUs, CPUs with AMX)
    mean: float = 0.5
    std: float = 0.25
    sensitivity: float = 0.95

    @property
    def model_classes(self) -> list[str]:
        """The classes of the weights file: [normal, *findings] for the abnormal head."""
        return ["normal", *self.findings] if self.head == "abnormal" else list(self.classes)
