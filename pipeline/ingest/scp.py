"""DICOM listener: C-ECHO and C-STORE SCP (pynetdicom) feeding the common ingest path.

Every storage SOP class is accepted at association time, not only CR and DX: a CT slice, an RT
plan or a structured report sent by mistake then reaches the handler, is recorded as a rejected
study with its reason, and the sender gets a failure status with that reason in the Error
Comment, rather than an anonymous presentation-context rejection it would not log. Transfer
syntaxes offered are those this installation can decode. A C-STORE is answered with Success
(0x0000) only after its study row is committed; bad input gets a failure status (0xA700 out of
resources for an oversize file, 0x0122 for a non-image SOP class, 0xC000 cannot understand for
everything that does not decode), a full disk 0xA700 with nothing stored, a database failure
0x0110.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.ingest.intake import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    Intake,
    failure_status,
)
from pipeline.queue.dispatch import QueueFull
from pipeline.settings import ConfigError, Settings
from pipeline.states import State
from pipeline.storage import StorageFull

log = logging.getLogger(__name__)
SUCCESS = 0x0000


def decodable_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes for which pydicom has a working decoder here (uncompressed first)."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import UID, AllTransferSyntaxes

    out = []
    for uid in AllTransferSyntaxes:
        try:
            if get_decoder(uid).is_available:
                out.append(uid)
        except NotImplementedError:
            continue
    return sorted(out, key=lambda u: UID(u).is_compressed)


def _status(code: int, comment: str | None = None) -> Any:
    from pydicom.dataset import Dataset

    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:64]  # LO: at most 64 characters
    return status


def handle_store(event: Any, intake: Intake, source: str = "dicom") -> Any:
    """C-STORE: commit the study (or its rejection), then answer."""
    try:
        data = event.encoded_dataset(include_meta=True)
    except Exception as exc:  # the dataset could not be re-encoded: it did not parse
        log.warning("C-STORE dataset could not be read (%s)", type(exc).__name__)
        return _status(0xC000, "the data set could not be read")
    sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "instance")
    filename = f"{sop_uid[:64]}.dcm"
    try:
        if len(data) > intake.limits.max_bytes:
            from pipeline.imaging.decode import content_key

            item = intake.reject_oversize(content_key(data), len(data), filename, source)
        else:
            item = intake.submit(data, filename, source)
    except QueueFull:
        # Out of resources: the work queue is full; the sender keeps it and sends it later.
        return _status(STATUS_OUT_OF_RESOURCES, "out of resources: queue full; send again later")
    except StorageFull:
        # Out of resources: the sender keeps the instance and sends it again later.
        return _status(STATUS_OUT_OF_RESOURCES, "out of resources: disk full; send again later")
    except Exception as exc:
        log.exception("C-STORE could not be stored (%s)", type(exc).__name__)
        return _status(STATUS_PROCESSING_FAILURE, "storage failed; try again later")
    if item.status == State.REJECTED:
        log.info("C-STORE rejected into study %s", item.study_id)
        return _status(failure_status(item.code), item.reason)
    log.info("C-STORE stored: study %s %s", item.study_id, item.status)
    return _status(SUCCESS)


def handle_echo(_event: Any) -> int:
    """C-ECHO: the listener is alive."""
    return SUCCESS


def build_ae(ae_title: str, allowed_aes: tuple[str, ...] = ()) -> Any:
    """An AE that answers Verification and every storage SOP class, with its calling-AE policy."""
    from pynetdicom import AE, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    if not ae_title or len(ae_title) > 16:
        raise ConfigError(f"AE title {ae_title!r} must be 1-16 characters")
    ae = AE(ae_title=ae_title)
    # Refuse any calling AE title not in the list with an A-ASSOCIATE-RJ (empty list: any).
    ae.require_calling_aet = list(allowed_aes)
    syntaxes = decodable_transfer_syntaxes()
    ae.add_supported_context(Verification, syntaxes[:4])
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
    ae.maximum_pdu_size = 0  # no limit on received PDUs: the size check is per data set
    return ae


def start_listener(
    settings: Settings, intake: Intake, host: str, port: int, block: bool = False
) -> Any:
    """Start the SCP; returns the threaded server (``block=False``) for ``shutdown()``."""
    from pynetdicom import evt

    ae = build_ae(settings.dicom_ae_title, settings.dicom_allowed_aes)
    handlers = [(evt.EVT_C_STORE, handle_store, [intake]), (evt.EVT_C_ECHO, handle_echo)]
    log.info("DICOM listener %s on %s:%d", settings.dicom_ae_title, host, port)
    return ae.start_server((host, port), block=block, evt_handlers=handlers)
