"""The model and its operating point in words a radiologist reads at a glance.

Thresholds and test-set metrics come from the weights file's metadata (``pipeline.classifier.weights``);
nothing here is typed in by hand, so the words change when the weights do.
"""

from __future__ import annotations

from typing import Any

# Test sets the shipped model card reports, in the order a reader meets them.
TEST_SETS = {
    "paediatric_test": "the paediatric test set",
    "adult_holdout": "the adult hold-out set",
    "nih_holdout": "the NIH hold-out set",
}


def _of_100(rate: float) -> int:
    return round(100 * rate)


def test_set_sentences(metrics: dict[str, Any]) -> list[str]:
    """One sentence per held-out test set: abnormal films caught, normal films cleared."""
    sentences = []
    for key, name in TEST_SETS.items():
        m = metrics.get(key) or {}
        sens, spec = m.get("sensitivity_abnormal"), m.get("specificity_abnormal")
        if sens is None or spec is None:
            continue
        n = f" ({m['n']:,} films never used in training)" if m.get("n") else ""
        sentences.append(
            f"On {name}{n} that catches {_of_100(sens)} of 100 abnormal films "
            f"and clears {_of_100(spec)} of 100 normal ones."
        )
    loso = metrics.get("loso") or {}
    if loso.get("mean_auc") is not None and loso.get("worst_auc") is not None:
        sentences.append(
            "Trained without a source and tried on it, as a new department would meet it, it "
            f"ranks an abnormal film above a normal one {_of_100(loso['mean_auc'])} times in 100 "
            f"on average, {_of_100(loso['worst_auc'])} in 100 on the hardest source."
        )
    return sentences


def operating_point(model: dict[str, Any]) -> dict[str, Any]:
    """Headline and sentences describing when the model flags a film, and how well."""
    thresholds = model.get("thresholds") or {}
    if not model.get("trained"):
        return {
            "headline": "This model is untrained: its probabilities are noise and its "
            "ordering must not be used for triage.",
            "sentences": [],
        }
    routine = thresholds.get("routine")
    headline = (
        f"Flags a film as abnormal when the model's probability of an abnormal finding is "
        f"at least {routine:.2f}"
        if routine is not None
        else "No operating point is stored with these weights"
    )
    levels = [
        f"{name} from {thresholds[name]:.2f}"
        for name in ("urgent", "critical")
        if name in thresholds
    ]
    if routine is not None and levels:
        headline += f"; {' and '.join(levels)}"
    return {"headline": headline + ".", "sentences": test_set_sentences(model.get("metrics") or {})}


def model_summary(model: dict[str, Any]) -> str:
    """'ResNet-18, version resnet18-cbc18aa96fd2 (cxr-resnet18.pt)'."""
    arch = str(model.get("arch") or "?").replace("resnet", "ResNet-")
    return f"{arch}, version {model.get('version')} ({model.get('file')})"
