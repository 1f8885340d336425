"""`cxr-triage bench-ingest` runs end to end on a tiny corpus (values checked, never timed)."""

from __future__ import annotations

import pydicom

from bench.ingest_bench import make_corpus, run


def test_corpus_files_are_distinct_and_jpeg2000_is_lossless(tmp_path) -> None:
    plain = make_corpus(tmp_path / "u", 2, "uncompressed")
    j2k = make_corpus(tmp_path / "j", 1, "jpeg2000")
    a, b = (pydicom.dcmread(p) for p in plain)
    c = pydicom.dcmread(j2k[0])
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.StudyInstanceUID != b.StudyInstanceUID
    assert c.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert (c.pixel_array == a.pixel_array).all()


def test_bench_reports_both_syntaxes(settings) -> None:
    doc = run(2, settings)
    assert doc["n"] == 2
    for syntax in ("uncompressed", "jpeg2000"):
        assert set(doc[syntax]) == {
            "files_per_s",
            "decode_only_files_per_s",
            "ingest_vs_decode",
            "mb_per_file",
        }
        assert doc[syntax]["files_per_s"] > 0
    assert doc["jpeg2000"]["mb_per_file"] < doc["uncompressed"]["mb_per_file"]
