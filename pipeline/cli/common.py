"""What several ``cxr-triage`` commands share: finding the running system's Redis, and
replacing this process with a child of the system."""

from __future__ import annotations

import math
import os
from typing import Any

from pipeline.queue.locate import resolve_redis_url
from pipeline.service.supervisor import child_env
from pipeline.settings import ConfigError, Settings


def require_redis(settings: Settings) -> str:
    """The Redis of the configured or running system; a clear error when there is none."""
    redis_url = resolve_redis_url(settings)
    if redis_url is None:
        raise ConfigError("no Redis: set CXR_REDIS_URL or start `cxr-triage run`")
    return redis_url


def exec_in_system(command: list[str], settings: Settings) -> int:
    """Replace this process with command, given the running system's environment."""
    env = child_env(settings, require_redis(settings))
    os.execvpe(command[0], command, env)
    return 1  # not reached


def torch_threads(n: int) -> None:
    """Use n threads for torch's CPU kernels (0: torch's own choice)."""
    if n > 0:
        import torch

        torch.set_num_threads(n)


def rounded(obj: Any) -> Any:
    """A metrics document for JSON: floats to 6 places, NaN as null."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else round(obj, 6)
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj
