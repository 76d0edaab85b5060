"""Which prompts one worker of N takes.

The release (``inference.py``) deals the prompt list out round-robin, ``prompts[rank::world_size]``.
It does so after dropping the names already written, which makes a worker's share depend on when it
looked: a Kubernetes pod restarted alone would see a shorter list than its peers and take names they
hold. Here the round-robin runs over the whole list, and each worker then skips what exists, so the
shares are disjoint and cover the list whatever each worker finds on disk (on a fresh run the two
rules give the same shares).
"""

from __future__ import annotations

import os
from typing import Sequence, TypeVar

T = TypeVar("T")

#: Set by Kubernetes in each pod of an Indexed Job: the pod's completion index.
JOB_INDEX_ENV = "JOB_COMPLETION_INDEX"


def check_shard(num_workers: int, worker_id: int) -> None:
    """Refuse a worker count or id that names no share (``ValueError`` naming the flag)."""
    if num_workers < 1:
        raise ValueError(f"--num-workers must be at least 1, got {num_workers}")
    if not 0 <= worker_id < num_workers:
        raise ValueError(f"--worker-id must lie in [0, {num_workers}), got {worker_id}")


def shard(items: Sequence[T], num_workers: int, worker_id: int) -> list[T]:
    """Worker ``worker_id``'s share of ``items`` (round-robin, as the release)."""
    check_shard(num_workers, worker_id)
    return list(items[worker_id::num_workers])


def default_worker_id() -> int:
    """``JOB_COMPLETION_INDEX`` when set (an Indexed Job's pod), else 0."""
    value = os.environ.get(JOB_INDEX_ENV, "").strip()
    if not value:
        return 0
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{JOB_INDEX_ENV}={value!r} is not an integer") from None
