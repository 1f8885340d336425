"""How often the lung localiser finds the lungs, per source, and a contact sheet to judge it by eye.

Run: ``python -m pipeline.training.preprocess_report CSV_OR_FOLDER... [--sheet out.png] [--json]``.
Counts every image's fallback (no two plausible lungs: the fixed central box was used); the
sheet shows a seeded sample per source: the film with the crop box (green: lungs found, red:
fallback) above the network input with the found lung outline, for a reader to count the crops
that cut a lung off or hold mostly something else.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.imaging.decode import decode_bytes, decode_preview, encode_preview
from pipeline.imaging.preprocess import preprocess
from pipeline.training import datasets as ds


def _film(path: Path) -> np.ndarray:
    decoded = decode_bytes(path.read_bytes(), path.name)
    return decode_preview(encode_preview(decoded.pixels))


def fallback_rates(samples: list[ds.Sample], size: int = 128) -> dict[str, Any]:
    """Per source: images, how many fell back to the fixed box, and the rate."""
    total, fell = Counter[str](), Counter[str]()
    for s in samples:
        total[s.source] += 1
        fell[s.source] += not preprocess(_film(s.path), size, "thorax")[1].found
    return {
        src: {"images": total[src], "fallback": fell[src], "rate": fell[src] / total[src]}
        for src in sorted(total)
    }


def contact_sheet(samples: list[ds.Sample], out: Path, per_source: int = 24, seed: int = 0) -> None:
    """A PNG: per source, per_source films with their crop box above the network input."""
    rng = random.Random(seed)
    rows = []
    for src in sorted({s.source for s in samples}):
        chosen = rng.sample([s for s in samples if s.source == src], per_source)
        tiles = []
        for s in chosen:
            film = _film(s.path)
            inp, loc = preprocess(film, 128, "thorax")
            top = cv2.cvtColor(cv2.resize(film, (128, 128)), cv2.COLOR_GRAY2BGR)
            r0, r1, c0, c1 = (int(v * 128) for v in loc.box)
            colour = (0, 200, 0) if loc.found else (0, 0, 255)
            cv2.rectangle(top, (c0, r0), (c1 - 1, r1 - 1), colour, 1)
            bottom = cv2.cvtColor(inp, cv2.COLOR_GRAY2BGR)
            if loc.lung_mask is not None:
                contours, _ = cv2.findContours(
                    loc.lung_mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
                )
                cv2.drawContours(bottom, contours, -1, (255, 80, 0), 1)
            tiles.append(np.vstack([top, bottom]))
        rows.append(np.hstack(tiles))
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), np.vstack(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="+")
    p.add_argument("--sheet", help="write a contact sheet PNG here")
    p.add_argument("--per-source", type=int, default=24)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    samples = ds.read_datasets(Path(d) for d in args.data)
    rates = fallback_rates(samples)
    if args.sheet:
        contact_sheet(samples, Path(args.sheet), args.per_source)
    if args.json:
        print(json.dumps(rates, separators=(",", ":")))
    else:
        for src, r in rates.items():
            print(f"{src:24s} {r['fallback']:5d} of {r['images']:5d} fell back ({r['rate']:.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
