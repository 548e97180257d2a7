"""One way to replace a small text file (config, manifest, pointer, report) so that a reader, or a
kill at any moment, finds the old file or the new one and never a part of either."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` into `.NAME.tmp` beside `path`, then rename it over `path` (one step on POSIX)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
