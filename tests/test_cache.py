"""The preprocessing cache: hits, invalidation on changed sources or parameters, sharing between processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from tace.client.cache import PreprocessCache
from tace.common.manifest import parse_manifest
from tace.common.preprocess import preprocess_record
from tests.conftest import TINY_CONFIG


def load_all(cache: PreprocessCache, manifest: Path) -> list[bool]:
    m = parse_manifest(manifest)
    return [cache.load(r, m.root).hit for r in m.records]


def test_hit_after_miss_and_same_tensor(site_copy, tmp_path):
    manifest = site_copy()
    cache = PreprocessCache(tmp_path / "cache", TINY_CONFIG)
    assert load_all(cache, manifest) == [False] * 8
    assert load_all(cache, manifest) == [True] * 8
    m = parse_manifest(manifest)
    cached = cache.load(m.records[3], m.root)
    fresh, info = preprocess_record(m.records[3], m.root, TINY_CONFIG)
    assert cached.hit and cached.info == info
    np.testing.assert_array_equal(cached.array, fresh)


def test_changed_source_invalidates_only_that_patient(site_copy, tmp_path):
    manifest = site_copy()
    cache = PreprocessCache(tmp_path / "cache", TINY_CONFIG)
    load_all(cache, manifest)
    m = parse_manifest(manifest)
    path = m.root / m.records[2].images["delayed"]
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(image * 2, str(path))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    hits = load_all(cache, manifest)
    assert hits == [True, True, False, True, True, True, True, True]
    result = cache.load(m.records[2], m.root)
    np.testing.assert_array_equal(result.array, preprocess_record(m.records[2], m.root, TINY_CONFIG)[0])


def test_changed_parameters_miss(site_copy, tmp_path):
    manifest = site_copy()
    load_all(PreprocessCache(tmp_path / "cache", TINY_CONFIG), manifest)
    other = PreprocessCache(tmp_path / "cache", replace(TINY_CONFIG, large_tumour="rescale"))
    assert load_all(other, manifest) == [False] * 8
    assert load_all(PreprocessCache(tmp_path / "cache", TINY_CONFIG), manifest) == [True] * 8


def test_damaged_entry_is_recomputed(site_copy, tmp_path):
    manifest = site_copy()
    cache = PreprocessCache(tmp_path / "cache", TINY_CONFIG)
    load_all(cache, manifest)
    m = parse_manifest(manifest)
    entry = cache.entry_path(cache.key(m.records[0], m.root))
    entry.write_bytes(entry.read_bytes()[:100])
    assert cache.load(m.records[0], m.root).hit is False
    assert cache.load(m.records[0], m.root).hit is True


def _loader_script(manifest: Path, cache_dir: Path) -> str:
    return textwrap.dedent(
        f"""
        from tace.client.cache import PreprocessCache
        from tace.common.manifest import parse_manifest
        from tests.conftest import TINY_CONFIG
        m = parse_manifest({str(manifest)!r})
        cache = PreprocessCache({str(cache_dir)!r}, TINY_CONFIG)
        print(sum(cache.load(r, m.root).hit for r in m.records))
        """
    )


def test_cache_serves_separate_processes(site_copy, tmp_path):
    """Flower starts a fresh client process per round: a second process must hit what the first wrote."""
    manifest = site_copy()
    script = _loader_script(manifest, tmp_path / "cache")
    cwd = Path(__file__).resolve().parents[1]
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, check=True)
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, check=True)
    assert (first.stdout.strip(), second.stdout.strip()) == ("0", "8")


def test_concurrent_writers_leave_valid_entries(site_copy, tmp_path):
    manifest = site_copy()
    script = _loader_script(manifest, tmp_path / "cache")
    cwd = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=cwd) for _ in range(3)]
    for p in procs:
        p.communicate(timeout=120)
        assert p.returncode == 0
    assert load_all(PreprocessCache(tmp_path / "cache", TINY_CONFIG), manifest) == [True] * 8
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_radiomics_from_a_fresh_tensor_reuse_its_box_mask_and_equal_those_from_a_cached_one(site_copy, tmp_path):
    from tace.common.preprocess import box_mask

    manifest = site_copy()
    m = parse_manifest(manifest)
    record = m.records[2]
    for reference in ("box", "liver"):
        config = replace(TINY_CONFIG, intensity_reference=reference)
        fresh_cache = PreprocessCache(tmp_path / f"fresh-{reference}", config)
        loaded = fresh_cache.load(record, m.root)
        assert not loaded.hit and loaded.info.tumour is not None
        mask, spacing = box_mask(record, m.root, config)
        np.testing.assert_array_equal(loaded.info.tumour, mask)
        assert loaded.info.spacing_mm == spacing
        fresh = fresh_cache.radiomics(record, m.root, loaded)
        # The same patient through a cache whose tensor was already there (no box mask with it): the mask is read.
        other = PreprocessCache(tmp_path / f"cached-{reference}", config)
        other.load(record, m.root)
        cached = other.load(record, m.root)
        assert cached.hit and cached.info.tumour is None
        np.testing.assert_array_equal(other.radiomics(record, m.root, cached), fresh)
