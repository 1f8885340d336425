"""The study viewer: one image at display size with its CAM, the study's other images, the
model's output in words, DICOM details, review actions, and the previous/next study under the
worklist's current filters. Opening a study is audited.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import select

from dashboard import db, settings
from dashboard.auth import audit
from dashboard.ohif_view import study_url
from dashboard.words import model_summary, operating_point
from pipeline.classifier.cam_place import place
from pipeline.classifier.weights import describe_weights
from pipeline.imaging import render
from pipeline.models import Image, Prediction, Review, Study, User
from pipeline.triage.filters import FilterError, WorklistFilter
from pipeline.triage.reviews import (
    FINDINGS,
    ReviewError,
    parse_truth,
    record_review,
    truth_words,
)
from pipeline.triage.studies import format_wait
from pipeline.triage.studies import waiting_seconds as _waiting_seconds
from pipeline.triage.worklist import neighbour_ids

bp = Blueprint("viewer", __name__)
FLASH = {
    "read": "Marked read.",
    "agree": "Recorded: you agree with the AI.",
    "disagree": "Recorded: you disagree with the AI.",
}
AGREEMENT = {
    "read": ".",
    "agree": "; you agree with the AI.",
    "disagree": "; you disagree with the AI.",
}


def _filters() -> WorklistFilter:
    try:
        return WorklistFilter.from_args(request.args)
    except FilterError:
        return WorklistFilter()  # a stale or hand-edited link still opens the study


def _latest_predictions(image_ids: list[int]) -> dict[int, Prediction]:
    rows = db().scalars(
        select(Prediction)
        .where(Prediction.image_id.in_(image_ids))
        .order_by(Prediction.created_at.asc())
    )
    return {p.image_id: p for p in rows}  # the newest wins


def _operating_in_force(model: dict[str, Any]) -> dict[str, Any]:
    """The operating point in words, at the thresholds of the site's policy in force."""
    from pipeline.triage.policy import active

    policy = active(db())
    if not policy.thresholds:
        return operating_point(model)
    words = operating_point({**model, "thresholds": policy.thresholds})
    scale = ", on probabilities under its temperature" if policy.temperature_scale != 1 else ""
    # The weights' test-set figures were measured at the weights' thresholds, not these.
    words["sentences"] = [
        f"These are this site's thresholds (policy version {policy.version}"
        f"{scale}), set from its own reviewed studies."
    ]
    return words


@bp.route("/studies/<int:study_id>")
@login_required
def study(study_id: int) -> Any:
    row = db().get(Study, study_id) or abort(404)
    images = db().scalars(select(Image).where(Image.study_id == study_id).order_by(Image.id)).all()
    predictions = _latest_predictions([i.id for i in images])
    wanted = request.args.get("image", type=int)
    shown = next((i for i in images if i.id == wanted), None) or next(
        (i for i in images if i.id in predictions), images[0] if images else None
    )
    reviews = (
        db()
        .execute(
            select(Review, User.username)
            .join(User, User.id == Review.user_id)
            .where(Review.study_id == study_id)
            .order_by(Review.id)
        )
        .all()
    )
    filters = _filters()
    prev_id, next_id = neighbour_ids(db(), row, filters)
    model = describe_weights(settings())
    audit("view_study", target=f"study:{study_id}")
    # view=ohif: the OHIF viewer in the page, the review panel beside it (nothing retyped)
    view = "ohif" if request.args.get("view") == "ohif" and study_url(row.study_uid) else None
    return render_template(
        "study.html",
        study=row,
        images=images,
        shown=shown,
        predictions=predictions,
        prediction=predictions.get(shown.id) if shown else None,
        reviews=reviews,
        model=model,
        model_summary=model_summary(model),
        operating=_operating_in_force(model),
        params=filters.params,
        prev_id=prev_id,
        next_id=next_id,
        waiting=format_wait(_waiting_seconds(row)),
        findings=FINDINGS,
        view=view,
        ohif_src=study_url(row.study_uid) if view else None,
    )


@bp.route("/studies/<int:study_id>/review", methods=["POST"])
@login_required
def review(study_id: int) -> Any:
    action = request.form.get("action", "")
    try:
        stated = parse_truth(request.form.get("truth"))
        review = record_review(
            db(),
            study_id,
            current_user.id,
            action,
            request.form.get("comment"),
            abnormal=stated,
            finding=request.form.get("finding"),
        )
    except ReviewError as exc:
        db().rollback()
        return render_template("error.html", message=str(exc)), 400
    db().commit()
    # The truth in words when the radiologist stated it; agree/disagree alone imply it.
    truth = truth_words(review.abnormal, review.finding) if stated is not None else None
    audit(
        "review",
        target=f"study:{study_id}",
        detail=review.action if truth is None else f"{review.action}; {truth}",
    )
    flash(FLASH[review.action] if truth is None else f"Recorded: {truth}{AGREEMENT[review.action]}")
    view = "ohif" if request.args.get("view") == "ohif" else None
    params: dict[str, Any] = dict(_filters().params)
    return redirect(url_for("viewer.study", study_id=study_id, view=view, **params))


def _image_or_404(image_id: int) -> Image:
    img = db().get(Image, image_id)
    if img is None or img.preview is None:
        abort(404)
    return img


def _prediction_or_404(image_id: int) -> Prediction:
    pred = (
        db()
        .scalars(
            select(Prediction)
            .where(Prediction.image_id == image_id)
            .order_by(Prediction.created_at.desc())
        )
        .first()
    )
    return pred or abort(404)


PRIVATE = {"Cache-Control": "private, max-age=300"}


@bp.route("/images/<int:image_id>/preview.jpg")
@login_required
def preview(image_id: int) -> Response:
    img = _image_or_404(image_id)
    return Response(img.preview, mimetype="image/jpeg", headers=PRIVATE)


@bp.route("/images/<int:image_id>/overlay.png")
@login_required
def overlay(image_id: int) -> Response:
    """The image with its CAM blended in (for export and for browsers without the layered view)."""
    img, pred = _image_or_404(image_id), _prediction_or_404(image_id)
    alpha = min(1.0, max(0.0, request.args.get("alpha", 0.45, type=float)))
    placed = place(db(), img, pred, settings().weights_path)
    png = render.overlay_png(placed.grey, placed.cam, alpha, placed.box)
    return Response(png, mimetype="image/png", headers=PRIVATE)


@bp.route("/images/<int:image_id>/cam.png")
@login_required
def cam(image_id: int) -> Response:
    """The CAM alone, transparent where the model did not look, at the image's display size,
    on the part of the film the model read."""
    img, pred = _image_or_404(image_id), _prediction_or_404(image_id)
    placed = place(db(), img, pred, settings().weights_path)
    h, w = placed.grey.shape
    png = render.heatmap_png(placed.cam, w, h, placed.box)
    return Response(png, mimetype="image/png", headers=PRIVATE)
