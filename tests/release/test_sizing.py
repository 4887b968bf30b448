"""Both stores sized together from the data disk (the thresholder's rules, for two)."""

from dataclasses import replace

import pytest

from grootfs_py.release.errors import ReleaseError
from grootfs_py.release.sizing import GiB, MiB, SizingInput, capacity_cap, plan

DEFAULTS = SizingInput()


@pytest.mark.parametrize(
    ("disk_gib", "props", "unpriv_gib", "priv_gib", "with_clean"),
    [
        # 100 GiB disk, 15 GiB reserved: 85 GiB split 80/20.
        (100, DEFAULTS, 68, 17, True),
        # half for each store
        (100, SizingInput(privileged_store_percent=50), 42.5, 42.5, True),
        # reserved -1: collection after creates off, the whole disk is the budget
        (40, SizingInput(reserved_space_for_other_jobs_in_mb=-1), 32, 8, False),
        # 20 GiB disk leaves 5 GiB after the reserve: the stores share the whole disk
        (20, DEFAULTS, 16, 4, True),
        # routine_gc: reserved = disk, so the whole disk and threshold 0
        (100, SizingInput(routine_gc=True), 80, 20, True),
    ],
)
def test_store_sizes_split_one_budget(disk_gib, props, unpriv_gib, priv_gib, with_clean):
    p = plan(int(disk_gib * GiB), {}, props)
    assert p.store("unprivileged").store_size_bytes == pytest.approx(unpriv_gib * GiB, abs=MiB)
    assert p.store("privileged").store_size_bytes == pytest.approx(priv_gib * GiB, abs=MiB)
    assert all(s.with_clean == with_clean for s in p.stores)
    assert all(s.store_size_bytes % MiB == 0 for s in p.stores)


@pytest.mark.parametrize("disk_gib", [16, 20, 31, 40, 100, 1000])
@pytest.mark.parametrize("percent", [5, 20, 50, 95])
def test_the_two_stores_never_exceed_what_the_reserve_leaves(disk_gib, percent):
    disk = disk_gib * GiB
    p = plan(disk, {}, SizingInput(privileged_store_percent=percent))
    total = sum(s.store_size_bytes for s in p.stores)
    if disk - 15 * GiB > 15 * GiB:
        assert total <= disk - 15 * GiB
        assert not p.warnings
    else:
        assert total <= disk
        assert "reserved space is not kept free" in p.warnings[0]


def test_thresholds_stay_below_what_the_filesystem_can_hold():
    p = plan(100 * GiB, {}, DEFAULTS)
    for s in p.stores:
        assert 0 < s.threshold_bytes <= capacity_cap(s.store_size_bytes) < s.store_size_bytes


def test_thresholds_split_the_usable_space():
    p = plan(100 * GiB, {}, SizingInput(reserved_space_for_other_jobs_in_mb=90 * 1024))
    # usable 10 GiB < 15 GiB: the stores take the whole disk, thresholds share the 10 GiB
    assert p.store("unprivileged").threshold_bytes == 8 * GiB
    assert p.store("privileged").threshold_bytes == 2 * GiB


def test_routine_gc_collects_on_every_create():
    p = plan(100 * GiB, {}, SizingInput(routine_gc=True))
    assert [s.threshold_bytes for s in p.stores] == [0, 0]
    assert not p.warnings


@pytest.mark.parametrize(
    ("legacy_mb", "expected"),
    [(2048, 2 * GiB), (0, 100 * GiB + 1), (10**9, None)],
)
def test_legacy_threshold_applies_to_each_store(legacy_mb, expected):
    p = plan(100 * GiB, {}, SizingInput(graph_cleanup_threshold_in_mb=legacy_mb))
    assert sum(s.store_size_bytes for s in p.stores) == 100 * GiB
    for s in p.stores:
        assert s.threshold_bytes == (expected or capacity_cap(s.store_size_bytes))


def test_a_restart_sizes_as_the_first_start_did():
    first = plan(100 * GiB, {}, DEFAULTS)
    # The backing files now use 3 GiB and 1 GiB of the disk.
    existing = {
        "unprivileged": (first.store("unprivileged").store_size_bytes, 3 * GiB),
        "privileged": (first.store("privileged").store_size_bytes, 1 * GiB),
    }
    again = plan(96 * GiB, existing, DEFAULTS)
    assert again.stores == tuple(replace(s, kept_existing=True) for s in first.stores)


def test_an_existing_backing_file_keeps_its_size_and_the_new_one_fits_the_rest():
    existing = {"unprivileged": (80 * GiB, 10 * GiB)}
    p = plan(90 * GiB, existing, DEFAULTS)  # disk as if empty: 100 GiB, budget 85 GiB
    assert p.store("unprivileged").store_size_bytes == 80 * GiB
    assert p.store("unprivileged").kept_existing
    assert p.store("privileged").store_size_bytes == 5 * GiB


def test_a_disk_too_small_for_two_stores_is_refused():
    with pytest.raises(
        ReleaseError, match="privileged store would get 51 MiB, below XFS's minimum"
    ):
        plan(1 * GiB, {}, SizingInput(privileged_store_percent=5))
