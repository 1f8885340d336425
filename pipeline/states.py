"""The values of the status and role columns, as string enums.

Each member is a ``str`` equal to the text the database stores (no migration: the columns stay
``String``), so a member compares equal to a value read back from a row, hashes like it (a dict
keyed by members is found by the plain string), formats as it (``f"{State.DONE}"`` is
``done``) and serialises to it (``json.dumps(State.DONE) == '"done"'``).

- ``State``: where a study or an image is (``studies.status``, ``images.status``): received,
  queued, processing, and the final ones, which the reconciler never picks up again: done,
  failed, rejected (unreadable at ingest), skipped (not a frontal chest film).
- ``Role``: what a user account is (``users.role``): the people who log in with a password
  (radiologist, admin) and the machine accounts that only hold an API token (feed, monitor).
- ``ObjectState``: a result object to send (``result_objects.status``): ready, or skipped when
  it cannot be sent (a JPEG/PNG study has no DICOM study to return results to).
- ``OutboxState``: one object owed to one destination (``outbox.status``): pending (waiting or
  backing off), sending (claimed under a lease), sent, failed (refused too often; resent by hand).
- ``ModelStatus``: a model in the registry (``model_versions.status``): candidate, shadow
  (scored alongside, never ranks), live, retired.

This module imports nothing but the standard library.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """The state of a study or an image (``Study.status``, ``Image.status``)."""

    RECEIVED = "received"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    SKIPPED = "skipped"


# Final states: a study or image in one of these is never picked up again by the reconciler.
FINAL_STATES = (State.DONE, State.FAILED, State.REJECTED, State.SKIPPED)
ACTIVE_STATES = (State.RECEIVED, State.QUEUED, State.PROCESSING)
# Every state, in the order the worklist's filter lists them.
ALL_STATES = (*ACTIVE_STATES, *FINAL_STATES)


class Role(StrEnum):
    """The role of a user account (``User.role``)."""

    RADIOLOGIST = "radiologist"
    ADMIN = "admin"
    FEED = "feed"
    MONITOR = "monitor"


ROLES = (Role.RADIOLOGIST, Role.ADMIN, Role.FEED, Role.MONITOR)
# People log in with a password; machine accounts (feed, monitor) only hold an API token.
PERSON_ROLES = (Role.RADIOLOGIST, Role.ADMIN)


class ObjectState(StrEnum):
    """The state of a result object (``ResultObject.status``)."""

    READY = "ready"
    SKIPPED = "skipped"


class OutboxState(StrEnum):
    """The state of an outbox row, one object owed to one destination (``OutboxItem.status``)."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


class ModelStatus(StrEnum):
    """The status of a model in the registry (``ModelVersion.status``)."""

    CANDIDATE = "candidate"
    SHADOW = "shadow"
    LIVE = "live"
    RETIRED = "retired"


MODEL_STATUSES = (
    ModelStatus.CANDIDATE,
    ModelStatus.SHADOW,
    ModelStatus.LIVE,
    ModelStatus.RETIRED,
)
