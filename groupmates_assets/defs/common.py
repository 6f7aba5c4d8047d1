"""Small helpers every stage's assets share: input fingerprints and JSON-safe metadata values."""

import hashlib
import json

import numpy as np


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
