"""Which preprocessing made a stored prediction: read from a file only while it still holds
that model version."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pipeline.classifier import registry
from pipeline.classifier.network import build_from_meta, default_meta, save_weights
from pipeline.db import make_engine, make_session_factory
from pipeline.migrate import upgrade
from pipeline.settings import Settings


def _model(path: Path, preprocess: str, seed: int) -> str:
    torch.manual_seed(seed)
    meta = {**default_meta(), "preprocess": preprocess}
    save_weights(build_from_meta(meta), meta, path)
    return registry.version_of(path)[0]


def test_a_replaced_file_no_longer_answers_for_the_version_it_held(
    settings: Settings, tmp_path: Path
) -> None:
    upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    shipped = tmp_path / "weights" / "cxr.pt"
    shipped.parent.mkdir()
    old = _model(shipped, "resize", 1)
    with factory() as session:
        row = registry.register(session, shipped, Path(settings.data_dir), None)
        session.commit()
        registry_copy = Path(row.path)
        # the settings' file and the registry's copy both hold the old version
        assert registry.preprocess_of(session, old, shipped) == "resize"
        # a newer model ships under the same name: the registry's copy still answers for old
        new = _model(shipped, "thorax", 2)
        assert new != old
        assert registry.preprocess_of(session, old, shipped) == "resize"
        assert registry.preprocess_of(session, new, shipped) == "thorax"
        # the registry's copy overwritten with the new model too: no file holds old any more,
        # so old is read as the whole film, not with the new model's thorax crop
        shutil.copyfile(shipped, registry_copy)
        assert registry.preprocess_of(session, old, shipped) == "resize"
        assert registry.preprocess_of(session, None, shipped) == "resize"
        assert registry.preprocess_of(session, "resnet18-000000000000", None) == "resize"
