"""Small helpers every stage's assets share: input fingerprints, JSON-safe metadata values, and the failure a retry
cannot fix."""

import hashlib
import json

import dagster as dg
import numpy as np


class PermanentFailure(dg.Failure):
    """A step failure no retry can fix (bad input, a missing upstream, settings that do not fit), with a message
    that says what to fix. Raised with ``allow_retries=False``, so the steps' retry policy (``STEP_RETRY``) leaves
    it alone and the message arrives at once; any other exception (storage, memory) is retried."""

    def __init__(self, description: str | None = None, metadata: dict | None = None):
        super().__init__(description=description, metadata=metadata, allow_retries=False)


def fingerprint(**parts) -> str:
    """12 hex digits identifying a set of inputs; outputs live under it, so changed inputs never mix with old."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def finite(value):
    """NaN/inf (e.g. Spearman of a constant prediction) as None, recursively, for JSON files and metadata."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
