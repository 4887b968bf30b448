"""Size both stores together from the disk left on the cell (garden's thresholder, for two).

Garden's thresholder sized each store on its own as ``disk - reserved``, so
the unprivileged and privileged sparse backing files could together promise
twice what was left after the reserved space, and grew until the partition
was full. Here one budget is split between the stores, so the two backing
files can never together outgrow it.

Rules (``disk`` is what ``/var/vcap/data`` would have available if our own
backing files were not there, so a restart sizes exactly as the first start):

- ``reserved`` = the reserved MiB; with ``routine_gc`` it is the whole disk.
- ``usable`` = ``disk - max(reserved, 0)``.
- the budget for both stores is ``usable`` when that exceeds 15 GiB, else the
  whole ``disk`` (with a warning: the reserved space is not honoured).
- each store gets its share of the budget (the privileged store its percent);
  a backing file that already exists keeps its size (it is never reformatted)
  and the others share what is left of the budget.
- each store's clean threshold is its share of ``max(usable, 0)``, but never
  more than what its XFS can really hold: a threshold above the filesystem's
  capacity never fires and the store fills up (ENOSPC).
- ``with_clean`` (collect after creates) is ``reserved >= 0``.
- legacy, when ``graph_cleanup_threshold_in_mb >= 0``: the budget is the whole
  disk, each store's threshold is that value (capped as above), or ``disk + 1``
  (never collect) when it is 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from grootfs_py.release.errors import ReleaseError

MiB = 1024**2
GiB = 1024**3
MIN_BUDGET_WITH_RESERVE = 15 * GiB
# mkfs.xfs refuses smaller filesystems (xfsprogs >= 5.19).
MIN_STORE_BYTES = 300 * MiB
# What XFS keeps for its log and metadata, as a fraction of the backing
# file: on small filesystems it is more than 5%, so thresholds stay below.
XFS_USABLE_FRACTION = 0.9
ALIGN = MiB


@dataclass(frozen=True)
class SizingInput:
    reserved_space_for_other_jobs_in_mb: int = 15360
    routine_gc: bool = False
    graph_cleanup_threshold_in_mb: int = -1
    privileged_store_percent: int = 20


@dataclass(frozen=True)
class StoreSize:
    name: str
    store_size_bytes: int
    threshold_bytes: int
    with_clean: bool
    kept_existing: bool


@dataclass(frozen=True)
class Plan:
    stores: tuple[StoreSize, ...]
    disk_bytes: int
    budget_bytes: int
    warnings: tuple[str, ...]

    def store(self, name: str) -> StoreSize:
        for s in self.stores:
            if s.name == name:
                return s
        raise KeyError(name)


def _align_down(n: int) -> int:
    return n - n % ALIGN


def shares(budget: int, percents: Sequence[tuple[str, int]]) -> dict[str, int]:
    """Split *budget* by percent; the rounding remainder goes to the first store."""
    out = {name: _align_down(budget * pct // 100) for name, pct in percents[1:]}
    out[percents[0][0]] = _align_down(budget - sum(out.values()))
    return out


def capacity_cap(store_size: int) -> int:
    return int(store_size * XFS_USABLE_FRACTION)


def plan(
    disk_available: int,
    existing: Mapping[str, tuple[int, int]],
    props: SizingInput,
) -> Plan:
    """Size the ``unprivileged`` and ``privileged`` stores.

    *disk_available* is statfs's ``f_bavail * f_bsize`` of the data
    partition; *existing* maps a store name to ``(apparent size, allocated
    bytes)`` of its backing file when that file exists.
    """
    percents = [
        ("unprivileged", 100 - props.privileged_store_percent),
        ("privileged", props.privileged_store_percent),
    ]
    warnings: list[str] = []
    disk = disk_available + sum(allocated for _, allocated in existing.values())
    legacy = props.graph_cleanup_threshold_in_mb >= 0
    reserved = disk if props.routine_gc else props.reserved_space_for_other_jobs_in_mb * MiB
    usable = disk - max(reserved, 0)

    if legacy:
        budget = disk
    elif usable > MIN_BUDGET_WITH_RESERVE:
        budget = usable
    else:
        budget = disk
        if not props.routine_gc:
            warnings.append(
                f"only {usable // MiB} MiB would be left after reserving "
                f"{max(reserved, 0) // MiB} MiB for other jobs: the stores use the whole "
                f"data disk ({disk // MiB} MiB) and the reserved space is not kept free"
            )

    sizes = shares(budget, percents)
    kept = {name: size for name, (size, _) in existing.items() if name in sizes}
    missing = [name for name in sizes if name not in kept]
    if missing:
        left = budget - sum(kept.values())
        fresh = shares(max(left, 0), [(n, p) for n, p in percents if n in missing])
        # When only some files exist, the new ones get their share but never
        # more than what the existing ones left of the budget.
        for name in missing:
            sizes[name] = min(sizes[name], fresh[name]) if kept else sizes[name]
    sizes.update(kept)

    for name, size in sizes.items():
        if name not in kept and size < MIN_STORE_BYTES:
            raise ReleaseError(
                f"size stores: the {name} store would get {size // MiB} MiB, below XFS's "
                f"minimum of {MIN_STORE_BYTES // MiB} MiB (data disk {disk // MiB} MiB)"
            )

    usable_shares = shares(max(usable, 0), percents)
    stores = []
    for name, _ in percents:
        size = sizes[name]
        if legacy:
            if props.graph_cleanup_threshold_in_mb == 0:
                threshold = disk + 1
            else:
                threshold = min(props.graph_cleanup_threshold_in_mb * MiB, capacity_cap(size))
        else:
            threshold = min(usable_shares[name], capacity_cap(size))
        stores.append(
            StoreSize(
                name=name,
                store_size_bytes=size,
                threshold_bytes=max(threshold, 0),
                with_clean=reserved >= 0,
                kept_existing=name in kept,
            )
        )
    total = sum(sizes.values())
    if total > disk:
        warnings.append(
            f"the existing backing files promise {total // MiB} MiB, more than the "
            f"{disk // MiB} MiB data disk: delete the stores to resize them"
        )
    return Plan(tuple(stores), disk, budget, tuple(warnings))
