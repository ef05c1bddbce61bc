"""The Numba cache guard: cached kernels built from other sources are removed before use,
module by module (a module's hash covers the kernel modules it imports)."""

from __future__ import annotations

import json

from engine.kernels import cache_guard


def _tree(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "kernel.py").write_text(
        "from engine.kernels.vecmath import exp\n\ndef f():\n    return exp(1)\n"
    )
    (tmp_path / "cpu" / "other.py").write_text("def g():\n    return 2\n")
    (tmp_path / "cpu" / "lazy.py").write_text(
        "def h():\n    from engine.kernels import vecmath\n    return vecmath.exp(3)\n"
    )
    (tmp_path / "vecmath.py").write_text("def exp(x):\n    return x\n")
    for folder in (tmp_path / "__pycache__", tmp_path / "cpu" / "__pycache__"):
        folder.mkdir(exist_ok=True)
    return tmp_path


def _cache(tmp_path, stem):
    files = [
        tmp_path / "cpu" / "__pycache__" / f"{stem}.f-1.py311.nbi",
        tmp_path / "cpu" / "__pycache__" / f"{stem}.f-1.py311.1.nbc",
    ]
    for f in files:
        f.write_bytes(b"machine code")
    return files


def _stamp(root):
    return json.loads((root / "__pycache__" / cache_guard.STAMP_NAME).read_text())


def test_unknown_cache_is_removed_and_stamped(tmp_path):
    root = _tree(tmp_path)
    files = _cache(root, "kernel") + _cache(root, "other")
    assert cache_guard.ensure_fresh(root)
    assert not any(f.exists() for f in files)
    assert _stamp(root) == cache_guard.module_hashes(root)


def test_cache_of_the_same_sources_is_kept(tmp_path):
    root = _tree(tmp_path)
    cache_guard.ensure_fresh(root)
    files = _cache(root, "kernel")  # compiled from the stamped sources
    assert not cache_guard.ensure_fresh(root)
    assert all(f.exists() for f in files)


def test_an_edit_in_an_imported_file_clears_the_importers_only(tmp_path):
    """The case Numba misses: the kernel's own file is unchanged, a callee's file is not.
    Modules that do not import the edited one keep their cache."""
    root = _tree(tmp_path)
    cache_guard.ensure_fresh(root)
    kernel, lazy, other = _cache(root, "kernel"), _cache(root, "lazy"), _cache(root, "other")
    (root / "vecmath.py").write_text("def exp(x):\n    return x + 0.0\n")
    assert cache_guard.ensure_fresh(root)
    assert not any(f.exists() for f in kernel + lazy)  # lazy imports count too
    assert all(f.exists() for f in other)
    kernel = _cache(root, "kernel")  # recompiled against the edit: kept from now on
    assert not cache_guard.ensure_fresh(root)
    assert all(f.exists() for f in kernel)


def test_an_edit_elsewhere_keeps_a_kernels_cache(tmp_path):
    root = _tree(tmp_path)
    cache_guard.ensure_fresh(root)
    kernel = _cache(root, "kernel")
    (root / "cpu" / "other.py").write_text("def g():\n    return 3\n")
    cache_guard.ensure_fresh(root)
    assert all(f.exists() for f in kernel)


def test_hash_sees_paths_and_bytes(tmp_path):
    root = _tree(tmp_path)
    before = cache_guard.module_hashes(root)
    (root / "vecmath.py").rename(root / "vecmath2.py")
    after = cache_guard.module_hashes(root)
    assert after["cpu/kernel.py"] != before["cpu/kernel.py"]
    assert after["cpu/other.py"] == before["cpu/other.py"]


def test_the_real_kernels_are_stamped_once_loaded():
    import engine.kernels.cpu  # noqa: F401  (the guard runs before any kernel loads)

    root = cache_guard.KERNELS_ROOT
    assert _stamp(root) == cache_guard.module_hashes(root)
    hashes = cache_guard.module_hashes(root)
    # the entry kernels' hashes cover the vector math they inline
    assert "cpu/parallel.py" in hashes and "cpu/vecmath.py" in hashes
