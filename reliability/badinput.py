"""The bad-input scenario: the corpus through the CLI ingest path of a running system.

Every file must end in its documented state with its documented reason, the good files mixed in
must be classified, and no process may die.
"""

from __future__ import annotations

import time

from sqlalchemy import select

from pipeline.models import Image
from reliability.corpus import cases, write_corpus
from reliability.metrics import Row, fill, wait_final, work_counters
from reliability.samples import PhiRegistry
from reliability.sender import CliSender
from reliability.system import System


def bad_input_row(system: System, phi: PhiRegistry, timeout: float) -> Row:
    """Send the corpus and compare each file's outcome with the documented one."""
    assert system.factory is not None and system.settings is not None
    row = Row("bad input corpus (CLI ingest)", system.profile.name)
    corpus = cases(phi)
    files = write_corpus(
        system.workdir / "corpus", corpus, system.settings.max_file_mb * 1024 * 1024
    )
    before = work_counters(system.factory)
    started = time.monotonic()
    sender = CliSender(system, list(files)).start()
    sender.join(timeout)
    ids = sorted(set(sender.image_ids.values()))
    row.failures += sender.errors[:5]
    if not wait_final(system.factory, ids, timeout):
        row.failures.append("not all final")
    row.recover_s = time.monotonic() - started
    fill(row, system.factory, ids, len(files), before)
    with system.factory() as session:
        found = {i.id: i for i in session.scalars(select(Image).where(Image.id.in_(ids)))}
    matched = 0
    for path, case in files.items():
        image = found.get(sender.image_ids.get(path, -1))
        status, reason = (image.status, image.reason or "") if image else ("missing", "")
        if status == case.status and case.reason in reason:
            matched += 1
        else:
            row.failures.append(
                f"{case.kind}: expected {case.status} '{case.reason}', got {status} '{reason[:80]}'"
            )
    for service in (*system.workers, system.dashboard):
        if service is not None and not service.alive():
            row.failures.append(f"the {service.name} died")
    row.note = f"{matched}/{len(files)} outcomes as documented"
    return row
