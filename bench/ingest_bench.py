"""`cxr-triage bench-ingest`: ingest throughput in one process, uncompressed vs JPEG 2000 CR.

The files are full-size chest CR: the real NEMA WG04 RG1 radiograph (1955 x 1841, 15 bits)
from ../shared/data when present, else a generated 2000 x 2000 12-bit chest. The JPEG 2000
variant is encoded here from the same pixels (lossless, pydicom + pylibjpeg-openjpeg), so both
runs carry the same image. Every file gets its own UIDs, so none is a duplicate. Ingest is the
CLI's path: decode, preview, commit in SQLite, model input and task to a private Redis.
Decode alone (``imaging.decode_bytes``) is timed on the same files, so the ratio shows what
ingest adds to decoding.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.classifier.weights import describe_weights
from pipeline.db import make_engine, make_session_factory
from pipeline.imaging import decode as imaging
from pipeline.imaging.decode import Limits
from pipeline.ingest.accept import Enqueuer, ingest_paths
from pipeline.migrate import upgrade
from pipeline.queue.connections import open_queue
from pipeline.service.redis_server import EmbeddedRedis
from pipeline.settings import Settings
from pipeline.store.instances import InstanceStore

RG1 = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "chest_cr_rg1"
SYNTAXES = ("uncompressed", "jpeg2000")


def source_dataset() -> Any:
    """The real RG1 chest CR when present, else a generated full-size 12-bit chest."""
    import pydicom

    if (RG1 / "RG1_UNCR.dcm").exists():
        return pydicom.dcmread(RG1 / "RG1_UNCR.dcm")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    y, x = np.mgrid[0:2000, 0:2000] / 2000.0
    lungs = np.exp(-((x - 0.3) ** 2 + (y - 0.5) ** 2) / 0.02)
    lungs += np.exp(-((x - 0.7) ** 2 + (y - 0.5) ** 2) / 0.02)
    noise = np.random.default_rng(0).normal(0, 0.02, x.shape)
    img = np.clip(0.75 - 0.45 * lungs + 0.25 * np.exp(-((x - 0.5) ** 2) / 0.004) + noise, 0, 1)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("bench.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (img * 4095).astype(np.uint16).tobytes()
    return ds


def make_corpus(folder: Path, n: int, syntax: str) -> list[Path]:
    """n files of one chest CR in one transfer syntax, each with its own UIDs."""
    from pydicom.uid import JPEG2000Lossless, generate_uid

    ds = source_dataset()
    if syntax == "jpeg2000":
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        path = folder / f"{syntax}-{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def time_ingest(paths: list[Path], db_url: str, redis_url: str, settings: Settings) -> float:
    """Files per second through ingest_paths with a real Redis sink."""
    upgrade(db_url)
    factory = make_session_factory(make_engine(db_url))
    client, dispatcher = open_queue(redis_url)
    model = describe_weights(settings)
    size, preprocess = model["input_size"], model["preprocess"]
    # Kept in the instance store, as the product does, in a folder of the bench's own.
    folder = tempfile.mkdtemp(prefix="cxr-bench-store-")
    sink = Enqueuer(
        factory, client, dispatcher, size, settings.payload_ttl_s, preprocess=preprocess
    )
    try:
        store = InstanceStore(Path(folder), 1 << 40)
        start = time.perf_counter()
        report = ingest_paths(factory, paths, Limits(), source="bench", sink=sink, store=store)
        elapsed = time.perf_counter() - start
    finally:
        dispatcher.close()
        client.close()
        shutil.rmtree(folder, ignore_errors=True)
    if len(report.accepted) != len(paths):
        raise RuntimeError(f"only {len(report.accepted)} of {len(paths)} files were accepted")
    return len(paths) / elapsed


def time_decode(paths: list[Path]) -> float:
    """Files per second through decode_bytes alone (read included), after one warm-up."""
    imaging.decode_bytes(paths[0].read_bytes(), paths[0].name)  # imports, plugin discovery
    start = time.perf_counter()
    for path in paths:
        imaging.decode_bytes(path.read_bytes(), path.name)
    return len(paths) / (time.perf_counter() - start)


def run(n: int, settings: Settings) -> dict[str, Any]:
    """Measure both transfer syntaxes; return the JSON document."""
    out: dict[str, Any] = {"n": n, "source": "RG1" if RG1.exists() else "generated"}
    with tempfile.TemporaryDirectory(prefix="cxr-bench-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        with EmbeddedRedis(tmp / "redis") as redis:
            for syntax in SYNTAXES:
                paths = make_corpus(tmp / syntax, n, syntax)
                decode = time_decode(paths)
                files_s = time_ingest(paths, f"sqlite:///{tmp / syntax}.db", redis.url, settings)
                out[syntax] = {
                    "files_per_s": round(files_s, 2),
                    "decode_only_files_per_s": round(decode, 2),
                    "ingest_vs_decode": round(files_s / decode, 2),
                    "mb_per_file": round(paths[0].stat().st_size / 1e6, 2),
                }
    out["jpeg2000_vs_uncompressed"] = round(
        out["jpeg2000"]["files_per_s"] / out["uncompressed"]["files_per_s"], 2
    )
    return out


def cmd_bench_ingest(args: argparse.Namespace, settings: Settings) -> int:
    doc = run(args.n, settings)
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"ingest, one process, n = {doc['n']} chest CR ({doc['source']}):")
    for syntax in SYNTAXES:
        r = doc[syntax]
        print(
            f"  {syntax:<13} {r['files_per_s']:6.2f} files/s  (decode alone "
            f"{r['decode_only_files_per_s']:.2f}/s, ratio {r['ingest_vs_decode']:.2f}; "
            f"{r['mb_per_file']:.1f} MB/file)"
        )
    print(f"  JPEG 2000 / uncompressed: {doc['jpeg2000_vs_uncompressed']:.2f}")
    return 0


def register(sub: Any) -> None:
    """Add `bench-ingest` to the CLI."""
    p = sub.add_parser("bench-ingest", help="ingest files/s: uncompressed vs JPEG 2000 CR")
    p.add_argument("--n", type=int, default=32, help="files per transfer syntax")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_bench_ingest)


if __name__ == "__main__":
    from pipeline.cli.main import main

    sys.exit(main(["bench-ingest", *sys.argv[1:]]))
