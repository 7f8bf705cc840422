"""One fingerprint for "the same training job": settings, starting files and rows, hashed in order."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path


def fingerprint(settings: dict, rows: Iterable[dict], files: Iterable[Path] = ()) -> str:
    """sha256 (hex) of the bytes of `files`, then `settings` as JSON (sorted keys), then every row as
    JSON (sorted keys), in order: the same inputs give the same value in any process, and a change
    to any of them changes it. `settings` must be JSON-serializable."""
    h = hashlib.sha256()
    for path in files:
        h.update(Path(path).read_bytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()
