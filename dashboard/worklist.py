"""The radiologist's pages: the worklist, a study, its images and CAM overlays."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import func, select

from dashboard import db, settings
from dashboard.auth import audit
from pipeline import imaging, render
from pipeline.models import Image, Prediction, Review, Study, User
from pipeline.reviews import ReviewError, record_review, reviewed_study_ids
from pipeline.studies import worklist_query
from pipeline.weights import describe_weights

bp = Blueprint("worklist", __name__)
PAGE_SIZE = 50


def model_info() -> dict[str, Any]:
    return describe_weights(settings())


@bp.route("/")
@login_required
def index() -> Any:
    page = max(1, request.args.get("page", 1, type=int))
    studies = db().scalars(worklist_query(PAGE_SIZE, (page - 1) * PAGE_SIZE)).all()
    total = db().scalar(select(func.count(Study.id))) or 0
    reviewed = reviewed_study_ids(db(), [s.id for s in studies])
    return render_template(
        "worklist.html",
        reviewed=reviewed,
        studies=studies,
        page=page,
        total=total,
        pages=max(1, -(-total // PAGE_SIZE)),
        model=model_info(),
    )


@bp.route("/studies/<int:study_id>")
@login_required
def study(study_id: int) -> Any:
    row = db().get(Study, study_id) or abort(404)
    images = db().scalars(select(Image).where(Image.study_id == study_id).order_by(Image.id)).all()
    predictions = {
        p.image_id: p
        for p in db().scalars(
            select(Prediction).where(Prediction.image_id.in_([i.id for i in images]))
        )
    }
    reviews = db().execute(
        select(Review, User.username).join(User, User.id == Review.user_id)
        .where(Review.study_id == study_id).order_by(Review.id)
    ).all()  # fmt: skip
    audit("view_study", target=f"study:{study_id}")
    return render_template("study.html", study=row, images=images, predictions=predictions,
                           reviews=reviews, model=model_info())  # fmt: skip


@bp.route("/studies/<int:study_id>/review", methods=["POST"])
@login_required
def review(study_id: int) -> Any:
    action = request.form.get("action", "")
    try:
        record_review(db(), study_id, current_user.id, action, request.form.get("comment"))
    except ReviewError as exc:
        db().rollback()
        return render_template("error.html", message=str(exc)), 400
    db().commit()
    audit("review", target=f"study:{study_id}", detail=action)
    flash({"read": "Marked read.", "agree": "Recorded: you agree with the AI.",
           "disagree": "Recorded: you disagree with the AI."}[action])  # fmt: skip
    return redirect(url_for("worklist.study", study_id=study_id))


def _image_or_404(image_id: int) -> Image:
    img = db().get(Image, image_id)
    if img is None or img.preview is None:
        abort(404)
    return img


@bp.route("/images/<int:image_id>/preview.jpg")
@login_required
def preview(image_id: int) -> Response:
    img = _image_or_404(image_id)
    return Response(img.preview, mimetype="image/jpeg", headers={"Cache-Control": "private"})


@bp.route("/images/<int:image_id>/overlay.png")
@login_required
def overlay(image_id: int) -> Response:
    img = _image_or_404(image_id)
    pred = db().scalars(
        select(Prediction)
        .where(Prediction.image_id == image_id)
        .order_by(Prediction.created_at.desc())
    ).first() or abort(404)
    alpha = min(1.0, max(0.0, request.args.get("alpha", 0.45, type=float)))
    png = render.overlay_png(
        imaging.decode_preview(img.preview),
        render.cam_array(pred.cam, pred.cam_h, pred.cam_w),
        alpha,
    )
    return Response(png, mimetype="image/png", headers={"Cache-Control": "private"})
