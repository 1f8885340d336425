"""The naive pattern, for comparison: a plain Flask endpoint, one image per request, batch 1."""

from __future__ import annotations

import http.client
import io
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image as PILImage

from bench.viewer_site import serving
from pipeline.imaging.preprocess import model_input_from_grey

if TYPE_CHECKING:  # torch is imported by the commands that run the model, not by the CLI
    from pipeline.classifier.network import Classifier


def naive_app(clf: Classifier, db_path: Path) -> Any:
    """The pattern most projects start with: one image per HTTP request, batch of one."""
    from flask import Flask, jsonify, request

    app = Flask("naive")
    lock = threading.Lock()
    conn = sqlite3.connect(db_path, check_same_thread=False)
    conn.execute("CREATE TABLE results (name TEXT, label TEXT, p REAL)")

    @app.post("/predict")
    def predict() -> Any:
        img = PILImage.open(io.BytesIO(request.get_data())).convert("L")
        arr = model_input_from_grey(np.asarray(img), clf.input_size, clf.preprocess)
        out = clf.predict(arr[None])
        label = clf.classes[int(out.cam_index[0])]
        with lock:
            conn.execute(
                "INSERT INTO results VALUES (?, ?, ?)",
                (request.args.get("name"), label, float(out.probabilities[0].max())),
            )
            conn.commit()
        return jsonify(label=label)

    return app


def measure_naive(clf: Classifier, paths: list[Path], workdir: Path) -> float:
    """Images/s of a Flask endpoint called once per image, sequentially, over loopback."""
    with serving(naive_app(clf, workdir / "naive.db")) as base:
        conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=60)
        for path in paths[:4]:  # warm-up
            conn.request("POST", "/predict?name=warm", body=path.read_bytes())
            conn.getresponse().read()
        start = time.perf_counter()
        for path in paths:
            conn.request("POST", f"/predict?name={path.name}", body=path.read_bytes())
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"naive endpoint answered {resp.status}")
        return len(paths) / (time.perf_counter() - start)
