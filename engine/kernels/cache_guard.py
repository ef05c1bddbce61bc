"""Keep Numba's on-disk kernel cache from serving machine code of older sources.

Numba checks a cached kernel against the timestamp and size of the file that defines it,
not of the files its callees live in: after an edit to, say, the vector exp in another
module, a cached kernel that inlined the old exp would still load. So before any kernel
loads, the kernels' package computes for every source file under ``engine/kernels/`` a
hash over that file and every kernel module it imports, directly or not (imports read
from the source, lazy ones included). Where a module's hash differs from the stamp left
beside the cache, its cached kernels (``<module>.*.nbi``/``.nbc`` in its ``__pycache__``)
are removed: they compile again once, against the current sources. An edit to one kernel
module thus recompiles that module and the ones that import it, not every kernel (a full
recompile takes minutes on 2 cores).

A read-only install (no writable ``__pycache__``) has no cache to guard here: Numba then
caches elsewhere or not at all, and nothing is removed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

from engine.atomic import write_text

KERNELS_ROOT = Path(__file__).resolve().parent
PACKAGE = "engine.kernels"  # the dotted name of KERNELS_ROOT
STAMP_NAME = "xent-kernel-sources.json"


def _modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under ``root`` (packages by their __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PACKAGE, *parts])] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The kernel modules a file imports (``import a.b``, ``from a import b``: both a.b and a)."""
    found = set()
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name:  # a.b.c also runs a.b and a
                if name in modules:
                    found.add(name)
                name = name.rpartition(".")[0]
    return found


def module_hashes(root: Path = KERNELS_ROOT) -> dict[str, str]:
    """Relative path -> sha256 over the file and every kernel module it imports, transitively."""
    modules = _modules(root)
    direct = {name: _imports(path, modules) for name, path in modules.items()}
    out = {}
    for name, path in modules.items():
        seen = {name}
        todo = [name]
        while todo:
            for dep in direct[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        digest = hashlib.sha256()
        for dep in sorted(seen):
            digest.update(modules[dep].relative_to(root).as_posix().encode() + b"\0")
            digest.update(modules[dep].read_bytes() + b"\0")
        out[path.relative_to(root).as_posix()] = digest.hexdigest()
    return out


def _cache_files(path: Path):
    """The cached kernels of one source file (Numba names them after the file's stem)."""
    cache = path.parent / "__pycache__"
    try:
        names = os.listdir(cache)
    except OSError:
        return
    for name in names:
        if name.startswith(path.stem + ".") and name.endswith((".nbi", ".nbc")):
            yield cache / name


def ensure_fresh(root: Path = KERNELS_ROOT) -> bool:
    """Remove cached kernels built from other sources; True when some were removed."""
    stamp = root / "__pycache__" / STAMP_NAME
    current = module_hashes(root)
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        recorded = {}  # no stamp yet: whatever is cached was built from unknown sources
    stale = [rel for rel, digest in current.items() if recorded.get(rel) != digest]
    if not stale:
        return False
    removed = False
    try:
        for rel in stale:
            for path in list(_cache_files(root / rel)):
                try:
                    path.unlink()
                    removed = True
                except FileNotFoundError:
                    pass  # another process removed it first
        stamp.parent.mkdir(exist_ok=True)
        write_text(stamp, json.dumps(current, indent=0, sort_keys=True) + "\n", fsync=False)
    except OSError:
        return removed  # read-only install: nothing of ours to guard
    return removed
