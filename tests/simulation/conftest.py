"""Fixtures the simulation tests share: settings with no weights and a database of their own."""

from __future__ import annotations

import pytest

from pipeline.settings import Settings


@pytest.fixture
def bare_settings(tmp_path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'sim.db'}",
        weights=tmp_path / "absent.pt",
    )
