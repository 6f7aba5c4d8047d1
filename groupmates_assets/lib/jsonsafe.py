"""Values made safe for JSON files and run metadata, which have no NaN or infinity."""

import numpy as np


def finite(value):
    """NaN/inf (e.g. Spearman of a constant prediction) as None, recursively, for JSON files and metadata."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
