"""Where the forward pass runs on a CPU: eager PyTorch, torch.compile, ONNX Runtime, OpenVINO.

Every runtime computes the same thing from a normalised N x 1 x S x S float32 batch: the
head's logits (N x O) and the layer4 feature maps (N x K x h x w) the CAM is made of, so the
classifier's head probabilities and CAMs are computed the same way whatever ran the network.
The int8 runtimes run an ONNX model quantised after training (static, QDQ, per-channel
weights) with activation ranges calibrated on training images; that model is made by
``cxr-triage bench --choose-runtime`` and kept beside the weights, because calibration needs
the training data a deployment does not have. Which runtime a worker uses is measured, not
assumed: ``resolve`` reads the record of ``pipeline.classifier.runtime_record``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.classifier.runtime_record import recorded_choice

log = logging.getLogger(__name__)

RUNTIMES = ("eager", "compile", "onnxruntime", "openvino", "onnxruntime-int8", "openvino-int8")
INT8 = ("onnxruntime-int8", "openvino-int8")
PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}

# (features, logits) of a normalised N x 1 x S x S float32 batch.
Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class RuntimeUnavailable(Exception):
    """A runtime cannot run here (its package is missing, or it has no int8 model)."""


class GreyNet(torch.nn.Module):
    """The ResNet on a one-channel input, returning (logits, layer4 features).

    The model reads one grey channel repeated three times, so conv1's weights summed over its
    input channels give the same output from the single channel (a third of conv1's work).
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        conv = model.conv1
        grey = torch.nn.Conv2d(
            1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False
        )
        with torch.no_grad():
            grey.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        self.conv1, self.bn1, self.relu, self.maxpool = grey, model.bn1, model.relu, model.maxpool
        self.layer1, self.layer2, self.layer3 = model.layer1, model.layer2, model.layer3
        self.layer4, self.avgpool, self.fc = model.layer4, model.avgpool, model.fc

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(feats), 1)), feats


def export_onnx(model: Any, input_size: int, path: Path) -> Path:
    """Write the float32 GreyNet as ONNX with a dynamic batch dimension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    net = GreyNet(model).eval()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    x = torch.zeros(2, 1, input_size, input_size)
    # The TorchScript exporter: the default one needs onnxscript, and this graph is plain.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (x,),
            str(tmp),
            input_names=["x"],
            output_names=["logits", "features"],
            dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}, "features": {0: "n"}},
            opset_version=17,
            dynamo=False,
        )
    os.replace(tmp, path)
    return path


def quantize_int8(fp32_onnx: Path, calibration: np.ndarray, path: Path) -> Path:
    """Static int8 (QDQ, per-channel weights) with activation ranges from calibration images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([calibration[i : i + 16] for i in range(0, len(calibration), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"x": np.ascontiguousarray(batch, np.float32)}

    pre = path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_onnx), str(pre))
    try:
        quantize_static(
            str(pre),
            str(path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
    finally:
        pre.unlink(missing_ok=True)
    return path


def _onnxruntime(path: Path, threads: int) -> Forward:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = session.run(None, {"x": x.numpy()})
        return torch.from_numpy(feats), torch.from_numpy(logits)

    return forward


def _openvino(path: Path, threads: int) -> Forward:
    import openvino as ov

    # f32 throughout: on a CPU with BF16 OpenVINO would otherwise choose bf16 for what is not int8.
    config = {
        "INFERENCE_NUM_THREADS": max(1, threads),
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    }
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = request.infer({0: x.numpy()})
        logits, feats = out[compiled.output(0)], out[compiled.output(1)]
        return torch.from_numpy(np.array(feats)), torch.from_numpy(np.array(logits))

    return forward


def _compiled(model: Any, pad_to: int) -> Forward:
    import torch._inductor.config as inductor

    inductor.freezing = True  # constant-folds the weights into the graph: inference only
    net = torch.compile(GreyNet(model).eval(), dynamic=False)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        if pad_to and n < pad_to:  # one compiled shape: a short batch is padded, not recompiled
            x = torch.cat([x, x.new_zeros((pad_to - n, *x.shape[1:]))])
        logits, feats = net(x)
        return feats[:n], logits[:n]

    return forward


def build_forward(
    name: str,
    model: Any,
    input_size: int,
    onnx_dir: Path,
    sha256: str,
    threads: int,
    pad_to: int = 0,
) -> Forward:
    """The forward pass of runtime ``name``; RuntimeUnavailable when it cannot run here."""
    if name == "compile":
        return _compiled(model, pad_to)
    package = name.removesuffix("-int8")
    if package not in PACKAGES:
        raise ValueError(f"unknown runtime {name!r}; choose one of {RUNTIMES}")
    try:
        __import__(PACKAGES[package])
    except ImportError as exc:
        raise RuntimeUnavailable(f"the {package} package is not installed ({exc})") from exc
    if name in INT8:
        path = onnx_dir / f"{sha256[:12]}.int8.onnx"
        if not path.exists():
            raise RuntimeUnavailable(
                f"no int8 model {path.name} in {onnx_dir} "
                "(made by `cxr-triage bench --choose-runtime`)"
            )
    else:
        path = onnx_dir / f"{sha256[:12]}.onnx"
        if not path.exists():
            export_onnx(model, input_size, path)
    return (_onnxruntime if package == "onnxruntime" else _openvino)(path, threads)


def onnx_dir_for(weights: Path) -> Path:
    """Where a weights file's exported and quantised ONNX models live (beside it)."""
    return weights.with_name(weights.stem + ".onnx")


def resolve(requested: str, weights: Path, sha256: str) -> str:
    """The runtime to try: the one asked for, or under 'auto' the recorded choice, else eager."""
    if requested != "auto":
        if requested not in RUNTIMES:
            raise ValueError(f"unknown runtime {requested!r}; choose auto or one of {RUNTIMES}")
        return requested
    choice = recorded_choice(weights, sha256)
    if choice is None:
        log.info(
            "runtime: eager PyTorch (no runtime measured for these weights on this CPU; "
            "`cxr-triage bench --choose-runtime` measures one)"
        )
        return "eager"
    return choice
