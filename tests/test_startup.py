"""Commands that do not run the network never import torch; the weights' metadata reads without it."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline.classifier.weights import WeightsError, read_meta
from pipeline.settings import Settings
from tests.conftest import REPO, settings_env

HEAVY = ("torch", "torchvision", "onnxruntime", "openvino")

PROBE = """
import json, sys
{body}
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def _heavy_modules_after(body: str, settings: Settings) -> list[str]:
    code = PROBE.format(body=body, heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=settings_env(settings),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_import_and_parser_do_not_import_torch(settings: Settings) -> None:
    body = "import pipeline.cli.main as cli\ncli.build_parser()"
    assert _heavy_modules_after(body, settings) == []


def test_worklist_db_and_ingest_without_a_system_do_not_import_torch(
    settings: Settings, tmp_path: Path
) -> None:
    from PIL import Image

    from tests.conftest import chest_like

    Image.fromarray(chest_like(256)).save(tmp_path / "a.png")
    body = (
        "import contextlib, io\nfrom pipeline.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['db', 'upgrade']) == 0\n"
        "    assert main(['worklist', '--json']) == 0\n"
        f"    assert main(['ingest', {str(tmp_path / 'a.png')!r}, '--json']) == 0\n"
        "    assert main(['worklist', '--json']) == 0"
    )
    assert _heavy_modules_after(body, settings) == []


def test_dashboard_app_does_not_import_torch(settings: Settings) -> None:
    body = (
        "from dashboard import create_app\napp = create_app()\n"
        "from pipeline.settings import Settings\nfrom pipeline.classifier.weights import describe_weights\n"
        "assert describe_weights(Settings.from_env())['input_size'] > 0"
    )
    assert _heavy_modules_after(body, settings) == []


def test_read_meta_equals_what_torch_loads(weights_file: Path, tmp_path: Path) -> None:
    from pipeline.classifier.network import build_model, default_meta, save_weights

    meta = {
        **default_meta(),
        "input_size": 128,
        "head": "abnormal",
        "findings": ["pneumonia"],
        "metrics": {"auc": 0.91, "per_source": {"a": [1, 2.5, None, True]}},
    }
    path = tmp_path / "w.pt"
    save_weights(build_model("resnet18", 2), meta, path)
    assert read_meta(path) == torch.load(path, weights_only=True)["meta"] == meta
    assert read_meta(weights_file) == torch.load(weights_file, weights_only=True)["meta"]


def test_read_meta_refuses_foreign_globals_and_non_archives(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"meta": {}, "x": subprocess.Popen}))
    with pytest.raises(WeightsError, match="subprocess.Popen is not allowed"):
        read_meta(evil)
    text = tmp_path / "text.pt"
    text.write_text("not a weights file")
    with pytest.raises(WeightsError, match="cannot read weights text.pt"):
        read_meta(text)
