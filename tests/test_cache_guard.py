"""The Numba cache guard: cached kernels built from other sources are removed before use."""

from __future__ import annotations

from engine.kernels import cache_guard


def _tree(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "kernel.py").write_text("def f():\n    return 1\n")
    (tmp_path / "vecmath.py").write_text("def exp(x):\n    return x\n")
    for folder in (tmp_path / "__pycache__", tmp_path / "cpu" / "__pycache__"):
        folder.mkdir(exist_ok=True)
    return tmp_path


def _cache(tmp_path):
    files = [
        tmp_path / "cpu" / "__pycache__" / "kernel.f-1.py311.nbi",
        tmp_path / "cpu" / "__pycache__" / "kernel.f-1.py311.1.nbc",
    ]
    for f in files:
        f.write_bytes(b"machine code")
    return files


def test_unknown_cache_is_removed_and_stamped(tmp_path):
    root = _tree(tmp_path)
    files = _cache(root)
    assert cache_guard.ensure_fresh(root)
    assert not any(f.exists() for f in files)
    stamp = root / "__pycache__" / cache_guard.STAMP_NAME
    assert stamp.read_text().strip() == cache_guard.source_hash(root)


def test_cache_of_the_same_sources_is_kept(tmp_path):
    root = _tree(tmp_path)
    cache_guard.ensure_fresh(root)
    files = _cache(root)  # compiled from the stamped sources
    assert not cache_guard.ensure_fresh(root)
    assert all(f.exists() for f in files)


def test_an_edit_in_another_file_clears_the_cache(tmp_path):
    """The case Numba misses: the kernel's own file is unchanged, a callee's file is not."""
    root = _tree(tmp_path)
    cache_guard.ensure_fresh(root)
    files = _cache(root)
    (root / "vecmath.py").write_text("def exp(x):\n    return x + 0.0\n")
    assert cache_guard.ensure_fresh(root)
    assert not any(f.exists() for f in files)
    files = _cache(root)  # recompiled against the edit: kept from now on
    assert not cache_guard.ensure_fresh(root)
    assert all(f.exists() for f in files)


def test_hash_sees_paths_and_bytes(tmp_path):
    root = _tree(tmp_path)
    before = cache_guard.source_hash(root)
    (root / "cpu" / "kernel.py").rename(root / "cpu" / "kernel2.py")
    assert cache_guard.source_hash(root) != before


def test_the_real_kernels_are_stamped_once_loaded():
    import engine.kernels.cpu  # noqa: F401  (the guard runs before any kernel loads)

    root = cache_guard.KERNELS_ROOT
    stamp = root / "__pycache__" / cache_guard.STAMP_NAME
    assert stamp.read_text().strip() == cache_guard.source_hash(root)
