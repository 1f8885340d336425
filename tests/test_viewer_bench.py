"""The viewer bench: milestones from a waterfall, and one tiny run (values checked, never timed)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from bench import viewer_bench, viewer_site
from bench.viewer_timing import PHASES, category, phases
from tests.browser.test_ohif_viewer import WHY_NOT
from tests.viewer.test_ohif_real_build import REAL_BUILD

BASE = "http://127.0.0.1:5000"
STUDY = f"{BASE}/dicomweb/studies/1.2"


def _row(url: str, start: float, end: float) -> dict[str, object]:
    return {"url": url, "kind": category(url), "start_ms": start, "end_ms": end}


def test_requests_are_sorted_by_what_they_were_for() -> None:
    assert [
        category(u)
        for u in (
            f"{BASE}/ohif/viewer?StudyInstanceUIDs=1.2",
            f"{BASE}/ohif/app.bundle.0123.js",
            f"{BASE}/ohif/app-config.js",
            f"{BASE}/dicomweb/studies?limit=101",
            f"{STUDY}/series?includefield=0008103E",
            f"{STUDY}/series/3/metadata",
            f"{STUDY}/series/3/instances/4/frames/1",
            f"{STUDY}/series/3/thumbnail",
            f"{BASE}/login",
        )
    ] == ["page", "app", "app", "qido", "qido", "metadata", "frames", "other", "other"]


def test_milestones_count_only_what_came_before_the_first_image() -> None:
    rows = [
        _row(f"{BASE}/ohif/viewer?StudyInstanceUIDs=1.2", 2, 20),
        _row(f"{BASE}/ohif/app.bundle.0123.js", 30, 400),
        _row(f"{BASE}/ohif/89.bundle.0123.js", 900, 950),
        _row(f"{BASE}/dicomweb/studies?limit=101", 1000, 1040),
        _row(f"{BASE}/ohif/2623.bundle.0123.js", 1010, 1100),  # after the first query: not boot
        _row(f"{STUDY}/series", 1050, 1090),
        _row(f"{STUDY}/series/3/metadata", 1100, 1180),
        _row(f"{STUDY}/series/3/instances/4/frames/1", 1500, 2100),
        _row(f"{STUDY}/series/9/instances/5/frames/1", 1510, 1600),
        _row(f"{STUDY}/series/3/instances/6/frames/1", 2600, 2900),  # after the image
    ]
    got = phases(rows, 2500.0)
    assert list(got) == list(PHASES)
    assert got == {
        "page": 20,
        "boot": 950,
        "qido": 1090,
        "metadata": 1180,
        "frame_asked": 1500,
        "frames": 2100,
        "first_image": 2500.0,
    }
    assert phases(rows[:1], 30.0) == {
        "page": 20,
        "boot": None,
        "qido": None,
        "metadata": None,
        "frame_asked": None,
        "frames": None,
        "first_image": 30.0,
    }


def test_the_twin_study_keeps_the_pixel_data_and_changes_every_uid(tmp_path: Path) -> None:
    if not (viewer_site.RG1 / "RG1_J2KR.dcm").exists():
        pytest.skip("../shared/data has no RG1 film")
    source = pydicom.dcmread(viewer_site.RG1 / "RG1_J2KR.dcm")
    twin = pydicom.dcmread(
        viewer_bench.twin_study(viewer_site.RG1 / "RG1_J2KR.dcm", tmp_path / "twin.dcm")
    )
    assert twin.PixelData == source.PixelData
    assert twin.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert twin[key].value != source[key].value
    assert twin.SOPInstanceUID == twin.file_meta.MediaStorageSOPInstanceUID


@pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
def test_a_network_is_rate_and_latency() -> None:
    assert viewer_bench.parse_network("100/2") == (100.0, 2.0)
    assert (
        viewer_bench.parse_network("54") == (54.0, 0.0) and viewer_bench.parse_network(None) is None
    )
    for bad in ("fast", "0/2", "10/-1"):
        with pytest.raises(SystemExit):
            viewer_bench.parse_network(bad)


@pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
def test_one_tiny_run_gives_the_documented_json(weights_file: Path) -> None:
    """One open each way, on an emulated network: compressed, and uncompressed in the same run."""
    doc, last = viewer_bench.run(
        1, ("jpeg", "jpeg_identity"), weights=weights_file, build=REAL_BUILD, network=(400.0, 1.0)
    )
    assert json.loads(json.dumps(doc)) == doc and list(doc["studies"]) == ["jpeg", "jpeg_identity"]
    assert doc["network"] == "emulated by Chromium: 400 Mbit/s, 1 ms latency"
    ratio = doc["compressed_over_identity"]["jpeg"]
    assert set(ratio) == {"cold", "warm"} and all(v > 0 for v in ratio.values())
    assert (
        doc["studies"]["jpeg_identity"]["first_look_ms"] == doc["studies"]["jpeg"]["first_look_ms"]
    )
    row = doc["studies"]["jpeg"]
    for state in ("cold", "warm"):
        first = row[f"{state}_ms"]
        assert first["min"] == first["median"] == first["max"] > 0
        ph = row[f"{state}_phases_ms"]
        assert ph["first_image"] == first["median"]
        order = [ph[k] for k in ("page", "qido", "metadata", "frame_asked", "first_image")]
        assert order == sorted(order), ph  # each milestone after the one before
        assert ph["frames"] <= ph["first_image"]
        assert row[f"{state}_main_thread_ms"]["tasks"] > 0 and row[f"{state}_cpu_ms"]["browser"] > 0
    assert row["first_look_ms"] > 0 and "cr_cold_under_goal" not in doc
    assert last["cold"]["requests"][0]["kind"] == "page" and last["cold"]["seen_by"] == "event"
    text = viewer_bench.table(doc)
    assert "JPEG study (1024 px baseline)" in text and "cold" in text and "warm" in text
    assert "compressed responses / uncompressed, same run" in text
