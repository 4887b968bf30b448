"""log.configure with a log file: created (with its directory), appended to, one line a write."""

import json
import os

from grootfs_py import log


def test_log_file_and_its_directory_are_created_and_appended_to(tmp_path):
    path = tmp_path / "new" / "dir" / "grootfs.log"
    path.parent.parent.mkdir()
    try:
        for n in range(2):
            log.configure("info", str(path), command="create")
            log.info("image created", id=f"i{n}", note="caf\u00e9")
            log.debug("not at info")
            log.close()
    finally:
        log.close()
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(r["message"], r["data"]["id"], r["data"]["note"]) for r in lines] == [
        ("grootfs.create.image-created", "i0", "caf\u00e9"),
        ("grootfs.create.image-created", "i1", "caf\u00e9"),
    ]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_closing_releases_the_descriptor(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    log.configure("info", str(tmp_path / "a.log"))
    assert len(os.listdir("/proc/self/fd")) == before + 1
    log.close()
    assert len(os.listdir("/proc/self/fd")) == before


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
