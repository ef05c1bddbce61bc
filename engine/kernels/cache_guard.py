"""Keep Numba's on-disk kernel cache from serving machine code of older sources.

Numba checks a cached kernel against the timestamp and size of the file that defines it,
not of the files its callees live in: after an edit to, say, the vector exp in another
module, a cached kernel that inlined the old exp would still load. So the CPU kernels'
package computes one hash over every source file under ``engine/kernels/`` before any
kernel loads, and when it differs from the stamp left beside the cache, removes the
cached kernels (``*.nbi``/``*.nbc`` in the ``__pycache__`` folders there): they compile
again once, against the current sources.

A read-only install (no writable ``__pycache__``) has no cache to guard here: Numba then
caches elsewhere or not at all, and nothing is removed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from engine.atomic import write_text

KERNELS_ROOT = Path(__file__).resolve().parent
STAMP_NAME = "xent-kernel-sources.sha256"


def source_hash(root: Path = KERNELS_ROOT) -> str:
    """sha256 over the relative path and bytes of every .py file under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def _cache_files(root: Path):
    for cache in root.rglob("__pycache__"):
        for name in os.listdir(cache):
            if name.endswith((".nbi", ".nbc")):
                yield cache / name


def ensure_fresh(root: Path = KERNELS_ROOT) -> bool:
    """Remove cached kernels built from other sources; True when some were removed."""
    stamp = root / "__pycache__" / STAMP_NAME
    current = source_hash(root)
    try:
        if stamp.read_text().strip() == current:
            return False
    except OSError:
        pass  # no stamp yet: whatever is cached was built from unknown sources
    removed = False
    try:
        for path in list(_cache_files(root)):
            try:
                path.unlink()
                removed = True
            except FileNotFoundError:
                pass  # another process removed it first
        stamp.parent.mkdir(exist_ok=True)
        write_text(stamp, current + "\n", fsync=False)
    except OSError:
        return removed  # read-only install: nothing of ours to guard
    return removed
