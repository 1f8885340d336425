"""A remote DICOM node, and the Study Root C-FIND, C-GET and C-MOVE we run against it."""

from __future__ import annotations

from typing import Any

from pipeline.settings import DicomNode

PENDING = (0xFF00, 0xFF01)
# C-GET/C-MOVE final statuses that still mean "some sub-operations were done".
WARNING_STATUSES = (0xB000,)


def identifier(level: str, **keys: Any) -> Any:
    """A Query/Retrieve identifier at ``level`` with these keys."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for name, value in keys.items():
        setattr(ds, name, value)
    return ds


class PacsClient:
    """Study Root C-FIND, C-GET and C-MOVE against one node, with our calling AE title."""

    def __init__(self, node: DicomNode, calling_ae: str, timeout_s: float = 30.0) -> None:
        self.node = node
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s

    def _ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        return ae

    def _associate(self, ae: Any, **kwargs: Any) -> Any:
        assoc = ae.associate(self.node.host, self.node.port, ae_title=self.node.ae_title, **kwargs)
        if not assoc.is_established:
            raise ConnectionError(f"{self.node} refused or did not answer the association")
        return assoc

    def find(self, queries: list[Any]) -> list[list[Any]]:
        """Run C-FINDs on one association; the matches of each query, in order."""
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StudyRootQueryRetrieveInformationModelFind as FIND,
        )

        ae = self._ae()
        ae.add_requested_context(FIND)
        assoc = self._associate(ae)
        try:
            out = []
            for query in queries:
                matches = []
                for status, identifier in assoc.send_c_find(query, FIND):
                    if status is None:
                        raise ConnectionError(f"{self.node} stopped answering a C-FIND")
                    code = int(status.Status)
                    if code in PENDING and identifier is not None:
                        matches.append(identifier)
                    elif code not in PENDING and code != 0x0000:
                        raise ConnectionError(f"{self.node} answered C-FIND with 0x{code:04X}")
                out.append(matches)
            return out
        finally:
            assoc.release()

    def get(self, requests: list[Any], sop_classes: set[str], store: Any) -> tuple[int, int]:
        """C-GET each identifier; ``store(event)`` handles each instance sent back.

        Returns (completed, failed) sub-operations as the PACS counts them.
        """
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StudyRootQueryRetrieveInformationModelGet as GET,
        )

        from pipeline.ingest.scp import decodable_transfer_syntaxes

        ae = self._ae()
        ae.add_requested_context(GET)
        syntaxes = decodable_transfer_syntaxes()
        # One context per storage class we expect; the association allows 128 in all.
        for uid in sorted(sop_classes)[:127]:
            ae.add_requested_context(uid, syntaxes)
        roles = [build_role(uid, scp_role=True) for uid in sorted(sop_classes)[:127]]
        assoc = self._associate(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, store)])
        try:
            return self._sub_operations(assoc.send_c_get(r, GET) for r in requests)
        finally:
            assoc.release()

    def move(self, requests: list[Any], destination: str) -> tuple[int, int]:
        """C-MOVE each identifier to ``destination`` (an AE the PACS knows)."""
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StudyRootQueryRetrieveInformationModelMove as MOVE,
        )

        ae = self._ae()
        ae.add_requested_context(MOVE)
        assoc = self._associate(ae)
        try:
            return self._sub_operations(assoc.send_c_move(r, destination, MOVE) for r in requests)
        finally:
            assoc.release()

    def _sub_operations(self, response_streams: Any) -> tuple[int, int]:
        completed = failed = 0
        for responses in response_streams:
            final = None
            for status, _identifier in responses:
                if status is None:
                    raise ConnectionError(f"{self.node} stopped answering a retrieve")
                final = status
            if final is None:
                continue
            code = int(final.Status)
            completed += int(getattr(final, "NumberOfCompletedSuboperations", 0) or 0)
            failed += int(getattr(final, "NumberOfFailedSuboperations", 0) or 0)
            if code not in (0x0000, *WARNING_STATUSES) and not failed:
                raise ConnectionError(f"{self.node} answered the retrieve with 0x{code:04X}")
        return completed, failed
