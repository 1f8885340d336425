"""Where a stored CAM lies on its film.

A model reads a crop of the film (``thorax``: the lung fields the localiser found, plus a
margin; pipeline.imaging.preprocess), so its CAM covers that crop, not the whole film. The crop is not
stored: it is a pure function of the stored preview and the model's preprocessing, so it is
found again here, by the same function that made the model input, and the CAM is drawn on
the part of the film the model read (the study page, the CAM capture, the SR's region).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from pipeline.classifier.registry import preprocess_of
from pipeline.imaging import decode as imaging
from pipeline.imaging.preprocess import input_box
from pipeline.imaging.render import Box, cam_array, peak_cell
from pipeline.models import Image, Prediction


@dataclass(frozen=True)
class PlacedCam:
    grey: np.ndarray  # the stored preview, uint8 h x w
    cam: np.ndarray  # float32, the model's grid
    box: Box  # where the grid lies on the film, fractions (r0, r1, c0, c1)

    @property
    def peak(self) -> Box:
        """The strongest cell on the film, fractions (r0, r1, c0, c1)."""
        return peak_cell(self.cam, self.box)


def place(session: Session, image: Image, pred: Prediction, weights: Path | None) -> PlacedCam:
    """The image's preview, its prediction's CAM and where that CAM lies on it."""
    if image.preview is None:
        raise LookupError(f"image {image.id} has no stored preview")
    grey = imaging.decode_preview(image.preview)
    box = input_box(grey, preprocess_of(session, pred.model_version, weights))
    return PlacedCam(grey, cam_array(pred.cam, pred.cam_h, pred.cam_w), box)


def snapshot_fields(
    session: Session, image: Image, pred: Prediction, weights: Path | None
) -> dict[str, object]:
    """What a result snapshot keeps of where the CAM lies: its box and its strongest cell on
    the film (fractions), and the film's size in pixels; nothing without a stored preview."""
    if image.preview is None:
        return {}
    placed = place(session, image, pred, weights)
    return {
        "cam_box": [round(v, 6) for v in placed.box],
        "cam_peak": [round(v, 6) for v in placed.peak],
        "columns": image.width,
        "rows": image.height,
    }
