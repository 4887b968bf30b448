"""The layer unpacker on a real filesystem, as root (mknod, chown, trusted.* xattrs)."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import forkserver as fs
import imagefactory as f
from grootfs_py.errors import UnpackError, VerificationError
from grootfs_py.idmap import IdMap, IdMapping
from grootfs_py.tarstream import FileSource
from grootfs_py.unpack import UnpackResult, unpack_layer

LAYER = "sha256:feedface"
GARDEN = IdMap(
    uids=(IdMapping(0, 4294967294, 1), IdMapping(1, 1, 4294967293)),
    gids=(IdMapping(0, 4294967294, 1), IdMapping(1, 1, 4294967293)),
)
NS = 1_000_000_000
IDENTITY = IdMap()


class Stream(io.RawIOBase):
    """A read-only, non-seekable stream, like a digest-checking reader."""

    def __init__(self, data: bytes, fail: BaseException | None = None) -> None:
        self.inner = io.BytesIO(data)
        self.fail = fail

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self.inner.readinto(buffer)
        if n == 0 and self.fail is not None:
            raise self.fail
        return n

    def remaining(self) -> int:
        return len(self.inner.getbuffer()) - self.inner.tell()


@dataclass
class Box:
    """dest (the layer directory) beside outside/, which no entry may touch.

    *positioned*: layers are read as a stack tar is, from a file by position
    (FileSource, data copied by sendfile), instead of as a stream.
    """

    root: Path
    dest: Path
    outside: Path
    positioned: bool = False

    def unpack(self, layer: list[f.Entry] | bytes, idmap: IdMap = IDENTITY) -> UnpackResult:
        data = layer if isinstance(layer, bytes) else f.layer_tar(layer)
        if not self.positioned:
            return unpack_layer(Stream(data), str(self.dest), idmap, layer=LAYER)  # type: ignore[arg-type]
        tar = self.root.with_name(self.root.name + "-layer.tar")  # not beside dest
        tar.write_bytes(data)
        with tar.open("rb") as fh:
            return unpack_layer(FileSource(fh.fileno()), str(self.dest), idmap, layer=LAYER)

    def snapshot_outside(self) -> dict[str, tuple[object, ...]]:
        """Everything beside dest, with metadata, contents and xattrs."""
        seen: dict[str, tuple[object, ...]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            if dirpath == str(self.root):
                dirnames.remove("dest")
            for name in [*dirnames, *filenames, "."]:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                content = Path(path).read_bytes() if stat.S_ISREG(st.st_mode) else b""
                xattrs = sorted((k, os.getxattr(path, k)) for k in os.listxattr(path))
                seen[path] = (st.st_mode, st.st_uid, st.st_nlink, st.st_mtime_ns, content, xattrs)
        return seen


@pytest.fixture(params=[False, True], ids=["stream", "positioned"])
def box(require_root: None, tmp_path: Path, request: pytest.FixtureRequest) -> Box:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (outside / "file").write_bytes(b"sentinel")
    return Box(tmp_path, dest, outside, positioned=request.param)


def xattrs_of(path: Path) -> dict[str, bytes]:
    return {
        k: os.getxattr(path, k, follow_symlinks=False)
        for k in os.listxattr(path, follow_symlinks=False)
    }


def open_fds() -> set[tuple[str, str]]:
    """This process's descriptors of files and directories, what an unpack opens.

    Sockets and pipes are left out: threads of the session's fixtures (the
    registries' proxy) open and close them at any moment, which twice made
    these checks fail on a descriptor no unpack had touched.
    """
    return {(fd, target) for fd, target in fs.open_files().items() if target.startswith("/")}


# -- files, metadata -----------------------------------------------------------


def test_regular_file_gets_content_mode_owner_and_mtime(box: Box) -> None:
    result = box.unpack([f.file("etc/motd", b"hi\n", mode=0o640, uid=1000, gid=1001, mtime=1234)])
    path = box.dest / "etc/motd"
    st = path.lstat()
    assert path.read_bytes() == b"hi\n"
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1000, 1001)
    assert st.st_mtime_ns == 1234 * NS
    assert result == UnpackResult(size_bytes=3)


def test_large_file_is_copied_intact(box: Box) -> None:
    data = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32 + 7)
    box.unpack([f.file("big", data)])
    assert (box.dest / "big").read_bytes() == data


@pytest.mark.parametrize(
    "entry",
    [
        f.file("suid", mode=0o4755, uid=1000),
        f.file("sgid", mode=0o2755, gid=1000),
        f.file("both", mode=0o6711, uid=1000, gid=1000),
        f.directory("sticky", mode=0o1777, uid=1000),
        f.directory("sgid-dir", mode=0o2775, gid=1000),
    ],
    ids=lambda e: e.name,
)
def test_setuid_setgid_and_sticky_bits_survive_chown(box: Box, entry: f.Entry) -> None:
    box.unpack([entry])
    assert stat.S_IMODE((box.dest / entry.name).lstat().st_mode) == entry.mode


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000], ids=oct)
def test_file_mode_and_owner_are_the_entry_s_whatever_the_umask_and_setgid_parent(
    box: Box, umask: int
) -> None:
    # Files are created with their mode less the umask, and chown/chmod
    # run only where the result differs: a setgid parent hands its group
    # to a new file, a restrictive umask takes bits away.
    layer = [
        f.directory("g", mode=0o2775, gid=1000),
        f.file("g/root-file", mode=0o644),
        f.file("g/open", mode=0o777, uid=0, gid=1000),
        f.file("g/none", b"data", mode=0o000),
        f.file("g/big", b"x" * (100 << 10), mode=0o4755, uid=1001, gid=1002),
        f.file("plain", mode=0o644),
        f.file("group-write", mode=0o664, uid=1000, gid=1000),
    ]
    old = os.umask(umask)
    try:
        box.unpack(layer)
    finally:
        os.umask(old)
    for entry in layer:
        st = (box.dest / entry.name).lstat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (
            entry.mode,
            entry.uid,
            entry.gid,
        ), entry.name
    assert (box.dest / "g/none").read_bytes() == b"data"


def test_mtimes_are_set_on_files_symlinks_and_directories_after_their_children(box: Box) -> None:
    box.unpack(
        [
            f.directory("d", mtime=1000),
            f.directory("d/sub", mtime=2000),
            f.file("d/sub/file", mtime=3000),
            f.symlink("d/link", "sub/file", mtime=4000),
            f.fifo("d/fifo"),
            f.file("d/late", mtime=5000),
        ]
    )
    mtime = {p: (box.dest / p).lstat().st_mtime_ns // NS for p in ("d", "d/sub", "d/sub/file")}
    assert mtime == {"d": 1000, "d/sub": 2000, "d/sub/file": 3000}
    assert (box.dest / "d/link").lstat().st_mtime_ns == 4000 * NS
    assert (box.dest / "d/fifo").lstat().st_mtime_ns == f.MTIME * NS


def test_pax_mtime_keeps_nanoseconds(box: Box) -> None:
    box.unpack(
        [
            f.file("file", mtime="1600000000.123456789"),
            f.directory("dir", mtime="1600000001.5"),
            f.symlink("link", "file", mtime="1600000002.000000001"),
        ]
    )
    assert (box.dest / "file").lstat().st_mtime_ns == 1600000000_123456789
    assert (box.dest / "dir").lstat().st_mtime_ns == 1600000001_500000000
    assert (box.dest / "link").lstat().st_mtime_ns == 1600000002_000000001


def test_root_directory_entry_applies_to_the_layer_directory(box: Box) -> None:
    box.unpack([f.directory("./", mode=0o750, uid=7, mtime=4242), f.file("a")])
    st = box.dest.lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns) == (0o750, 7, 4242 * NS)


def test_hardlinks_share_one_inode_and_count_once(box: Box) -> None:
    result = box.unpack([f.file("a", b"x" * 100), f.hardlink("b", "a"), f.hardlink("dir/c", "./a")])
    inodes = {(box.dest / p).lstat().st_ino for p in ("a", "b", "dir/c")}
    assert len(inodes) == 1
    assert (box.dest / "a").lstat().st_nlink == 3
    assert result.size_bytes == 100


def test_size_counts_each_regular_file_and_not_replaced_ones(box: Box) -> None:
    result = box.unpack(
        [
            f.file("a", b"1" * 10),
            f.file("b", b"2" * 20),
            f.file("a", b"3" * 5),
            f.symlink("s", "a"),
            f.directory("d"),
        ]
    )
    assert result.size_bytes == 25


def test_symlink_target_is_written_verbatim_with_owner(box: Box) -> None:
    box.unpack([f.symlink("abs", "/etc/shadow", uid=1000), f.symlink("up", "../../..")])
    assert os.readlink(box.dest / "abs") == "/etc/shadow"
    assert os.readlink(box.dest / "up") == "../../.."
    assert (box.dest / "abs").lstat().st_uid == 1000


def test_fifo_is_created(box: Box) -> None:
    box.unpack([f.fifo("run/pipe", mode=0o620)])
    st = (box.dest / "run/pipe").lstat()
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o620


@pytest.mark.parametrize(
    "entry", [f.chardev("dev/null"), f.blockdev("dev/loop0")], ids=["chr", "blk"]
)
def test_device_nodes_are_skipped(box: Box, entry: f.Entry) -> None:
    box.unpack([f.directory("dev"), entry, f.file("after")])
    assert os.listdir(box.dest / "dev") == []
    assert (box.dest / "after").exists()


def test_missing_parent_directories_are_created_0755_owned_by_mapped_root(box: Box) -> None:
    box.unpack([f.file("a/b/c/file", uid=1000)], GARDEN)
    for p in ("a", "a/b", "a/b/c"):
        st = (box.dest / p).lstat()
        assert stat.S_ISDIR(st.st_mode)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 4294967294, 4294967294)


# -- xattrs --------------------------------------------------------------------

CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")


def test_xattrs_from_pax_headers_are_set(box: Box) -> None:
    box.unpack(
        [
            f.directory("d", xattrs={"user.dir": b"on a dir"}),
            f.file("d/f", xattrs={"user.plain": b"text", "user.binary": b"\xff\x00\xfe"}),
        ]
    )
    assert xattrs_of(box.dest / "d") == {"user.dir": b"on a dir"}
    assert xattrs_of(box.dest / "d/f") == {"user.plain": b"text", "user.binary": b"\xff\x00\xfe"}


def test_security_capability_survives_chown_and_setuid_chmod(box: Box) -> None:
    box.unpack(
        [
            f.file(
                "bin/ping",
                b"\x7fELF",
                mode=0o4755,
                uid=1000,
                xattrs={"security.capability": CAP_NET_RAW},
            )
        ],
        GARDEN,
    )
    path = box.dest / "bin/ping"
    assert os.getxattr(path, "security.capability") == CAP_NET_RAW
    assert stat.S_IMODE(path.lstat().st_mode) == 0o4755
    assert path.lstat().st_uid == 1000


def test_symlink_xattrs_land_on_the_link_not_its_target(box: Box) -> None:
    box.unpack(
        [
            f.file("target"),
            f.raw(
                "link",
                tarfile.SYMTYPE,
                linkname="target",
                pax={"SCHILY.xattr.trusted.note": "on link", "SCHILY.xattr.user.no": "x"},
            ),
        ]
    )
    assert xattrs_of(box.dest / "link") == {"trusted.note": b"on link"}
    assert xattrs_of(box.dest / "target") == {}


@pytest.mark.parametrize(
    "xattr",
    ["trusted.overlay.opaque", "trusted.overlay.redirect", "user.overlay.opaque"],
)
def test_overlay_xattrs_from_the_image_are_ignored(box: Box, xattr: str) -> None:
    box.unpack(
        [
            f.directory("d", xattrs={xattr: b"y", "user.kept": b"1"}),
            f.file("f", xattrs={xattr: b"/etc"}),
        ]
    )
    assert xattrs_of(box.dest / "d") == {"user.kept": b"1"}
    assert xattrs_of(box.dest / "f") == {}


# -- whiteouts -----------------------------------------------------------------


def test_whiteout_is_char_device_0_0_owned_by_mapped_root(box: Box) -> None:
    box.unpack([f.directory("etc"), f.whiteout("etc/gone")], GARDEN)
    st = (box.dest / "etc/gone").lstat()
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == os.makedev(0, 0)
    assert (st.st_uid, st.st_gid) == (4294967294, 4294967294)
    assert os.listdir(box.dest / "etc") == ["gone"]


def test_whiteout_creates_its_missing_parents(box: Box) -> None:
    box.unpack([f.whiteout("a/b/gone")])
    assert stat.S_ISCHR((box.dest / "a/b/gone").lstat().st_mode)


@pytest.mark.parametrize("with_dir_entry", [True, False], ids=["dir-in-layer", "dir-missing"])
def test_opaque_whiteout_marks_directory_opaque(box: Box, with_dir_entry: bool) -> None:
    entries = [f.directory("etc", mode=0o700)] if with_dir_entry else []
    box.unpack([*entries, f.opaque("etc"), f.file("etc/kept")])
    assert os.getxattr(box.dest / "etc", "trusted.overlay.opaque") == b"y"
    assert os.listdir(box.dest / "etc") == ["kept"]


def test_whiteout_of_an_earlier_directory_of_this_layer_makes_it_opaque(box: Box) -> None:
    box.unpack([f.file("d/own"), f.whiteout("d")])
    assert os.getxattr(box.dest / "d", "trusted.overlay.opaque") == b"y"
    assert os.listdir(box.dest / "d") == ["own"]


def test_whiteout_of_an_earlier_file_of_this_layer_keeps_the_file(box: Box) -> None:
    box.unpack([f.file("f", b"mine"), f.whiteout("f")])
    assert (box.dest / "f").read_bytes() == b"mine"


@pytest.mark.parametrize(
    "later",
    [f.directory("x"), f.file("x/child")],
    ids=["directory-entry", "implicit-parent"],
)
def test_directory_over_a_whiteout_of_this_layer_becomes_opaque(box: Box, later: f.Entry) -> None:
    box.unpack([f.whiteout("x"), later])
    assert (box.dest / "x").is_dir()
    assert os.getxattr(box.dest / "x", "trusted.overlay.opaque") == b"y"


@pytest.mark.parametrize("name", ["a/.wh..wh.plnk", "a/.wh..wh.aufs"])
def test_reserved_whiteout_names_are_skipped(box: Box, name: str) -> None:
    box.unpack([f.raw(name)])
    assert os.listdir(box.dest) == []


# -- replacement ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "check"),
    [
        pytest.param(
            [f.file("x", b"old"), f.file("x", b"new")],
            lambda d: (d / "x").read_bytes() == b"new",
            id="file-replaces-file",
        ),
        pytest.param(
            [f.file("x", b"old"), f.directory("x")],
            lambda d: (d / "x").is_dir(),
            id="directory-replaces-file",
        ),
        pytest.param(
            [f.file("x/deep/child"), f.file("x", b"flat")],
            lambda d: (d / "x").read_bytes() == b"flat",
            id="file-replaces-directory-recursively",
        ),
        pytest.param(
            [f.file("x/child"), f.directory("x", mode=0o700, uid=5)],
            lambda d: (
                (d / "x/child").exists()
                and stat.S_IMODE((d / "x").lstat().st_mode) == 0o700
                and (d / "x").lstat().st_uid == 5
            ),
            id="directory-keeps-children-updates-metadata",
        ),
        pytest.param(
            [f.symlink("x", "target"), f.file("x", b"file")],
            lambda d: (d / "x").read_bytes() == b"file",
            id="file-replaces-symlink",
        ),
        pytest.param(
            [f.file("x"), f.symlink("x", "elsewhere")],
            lambda d: os.readlink(d / "x") == "elsewhere",
            id="symlink-replaces-file",
        ),
        pytest.param(
            [f.file("x", b"a"), f.file("y", b"b"), f.hardlink("x", "y")],
            lambda d: (d / "x").read_bytes() == b"b",
            id="hardlink-replaces-file",
        ),
        pytest.param(
            [f.file("d/e/x"), f.symlink("d", "e"), f.directory("d"), f.file("d/e/y", b"2")],
            lambda d: sorted(os.listdir(d / "d")) == ["e"] and os.listdir(d / "d/e") == ["y"],
            id="directory-recreated-after-replacement-starts-empty",
        ),
        pytest.param(
            [f.file("d/x", b"1"), f.file("d", b"flat"), f.file("d/x", b"2")],
            None,
            id="file-under-a-replaced-directory-fails",
        ),
    ],
)
def test_later_entry_replaces_earlier_one(
    box: Box, entries: list[f.Entry], check: Callable[[Path], bool] | None
) -> None:
    if check is None:
        with pytest.raises(UnpackError, match="entry d/x: parent d is not a directory"):
            box.unpack(entries)
    else:
        box.unpack(entries)
        assert check(box.dest)


# -- id mapping ----------------------------------------------------------------


def test_garden_mappings_shift_root_and_keep_other_ids(box: Box) -> None:
    box.unpack(
        [
            f.directory("etc"),
            f.file("etc/passwd"),
            f.file("home", uid=1000, gid=1000),
            f.symlink("link", "home", uid=0, gid=1000),
        ],
        GARDEN,
    )
    owners = {p: (box.dest / p).lstat()[4:6] for p in ("etc", "etc/passwd", "home", "link")}
    assert owners == {
        "etc": (4294967294, 4294967294),
        "etc/passwd": (4294967294, 4294967294),
        "home": (1000, 1000),
        "link": (4294967294, 1000),
    }


def test_unmapped_id_is_an_error_naming_the_entry(box: Box) -> None:
    narrow = IdMap(uids=(IdMapping(0, 100000, 65536),), gids=(IdMapping(0, 100000, 65536),))
    with pytest.raises(UnpackError) as caught:
        box.unpack([f.file("ok"), f.file("nobody", uid=70000)], narrow)
    assert str(caught.value) == (
        f"unpack layer {LAYER}: entry nobody: uid 70000 is not mapped in this store"
    )


# -- escapes -------------------------------------------------------------------

ESCAPES = [
    pytest.param([f.raw("../outside/x", data=b"p")], id="dotdot"),
    pytest.param([f.raw("/../../outside/x", data=b"p")], id="absolute-dotdot"),
    pytest.param([f.raw("a/../../outside/x", data=b"p")], id="inner-dotdot"),
    pytest.param([f.raw("../outside/file", data=b"p")], id="dotdot-overwrite"),
    pytest.param([f.raw("../outside", tarfile.DIRTYPE)], id="dotdot-directory"),
    pytest.param([f.raw("../outside/file", tarfile.SYMTYPE, linkname="/")], id="dotdot-symlink"),
    pytest.param([f.symlink("evil", "../outside"), f.file("evil/x", b"p")], id="symlink-parent"),
    pytest.param(
        [f.symlink("evil", "../outside"), f.file("evil/file", b"p")], id="symlink-parent-overwrite"
    ),
    pytest.param(
        [f.symlink("evil", "/"), f.file("evil{outside}/x", b"p")], id="absolute-symlink-parent"
    ),
    pytest.param(
        [f.symlink("evil", "../../../../../../.."), f.file("evil{outside}/x", b"p")],
        id="climbing-symlink-parent",
    ),
    pytest.param(
        [f.symlink("a", "b"), f.symlink("b", "../outside"), f.file("a/x", b"p")],
        id="symlink-chain",
    ),
    pytest.param(
        [
            f.directory("d"),
            f.symlink("d/up", ".."),
            f.symlink("evil", "d/up/../outside"),
            f.file("evil/x", b"p"),
        ],
        id="symlink-chain-through-dotdot",
    ),
    pytest.param(
        [f.symlink("evil", "../outside"), f.directory("evil/newdir")], id="directory-via-symlink"
    ),
    pytest.param(
        [f.symlink("evil", "../outside"), f.symlink("evil/link", "/")], id="symlink-via-symlink"
    ),
    pytest.param([f.symlink("evil", "../outside"), f.fifo("evil/fifo")], id="fifo-via-symlink"),
    pytest.param([f.hardlink("x", "../outside/file")], id="hardlink-dotdot"),
    pytest.param([f.hardlink("x", "{outside}/file")], id="hardlink-absolute"),
    pytest.param(
        [f.symlink("evil", "../outside"), f.hardlink("x", "evil/file")],
        id="hardlink-through-symlink",
    ),
    pytest.param(
        [f.symlink("evil", "/"), f.hardlink("x", "evil{outside}/file")],
        id="hardlink-through-absolute-symlink",
    ),
    pytest.param(
        [f.symlink("evil", "../outside"), f.hardlink("evil/x", "a")], id="hardlink-into-symlink"
    ),
    pytest.param(
        [f.symlink("evil", "../outside"), f.whiteout("evil/file")], id="whiteout-via-symlink"
    ),
    pytest.param(
        [f.symlink("evil", "../outside"), f.whiteout("evil/new")], id="whiteout-create-via-symlink"
    ),
    pytest.param([f.symlink("evil", "../outside"), f.opaque("evil")], id="opaque-via-symlink"),
    pytest.param([f.raw("a/.wh..")], id="whiteout-of-dotdot"),
    pytest.param(
        [f.file("d/x"), f.symlink("d", "../outside"), f.file("d/y", b"p")],
        id="directory-replaced-by-symlink-then-child",
    ),
    pytest.param(
        [f.file("a/b/c/x"), f.symlink("a", "../outside"), f.file("a/b/c/y", b"p")],
        id="ancestor-replaced-by-symlink-then-deep-child",
    ),
    pytest.param(
        [f.symlink("evil", "../outside"), f.raw("evil/.wh..wh..opq")], id="raw-opaque-via-symlink"
    ),
]


@pytest.mark.parametrize("entries", ESCAPES)
def test_entry_escaping_the_layer_fails_and_changes_nothing_outside(
    box: Box, entries: list[f.Entry]
) -> None:
    entries = [_fill(e, box) for e in entries]
    before = box.snapshot_outside()
    with pytest.raises(UnpackError, match=f"^unpack layer {LAYER}: entry ") as caught:
        box.unpack([f.file("a", b"in layer"), *entries])
    assert "entry" in str(caught.value)
    assert box.snapshot_outside() == before


NOT_ESCAPES = [
    pytest.param(
        [f.symlink("evil", "../outside/file"), f.file("evil", b"p")],
        lambda d: (d / "evil").read_bytes() == b"p",
        id="file-replaces-symlink-to-outside",
    ),
    pytest.param(
        [f.symlink("evil", "../outside"), f.directory("evil", mode=0o700)],
        lambda d: (d / "evil").is_dir() and not (d / "evil").is_symlink(),
        id="directory-replaces-symlink-to-outside",
    ),
    pytest.param(
        [f.symlink("evil", "../outside/file"), f.hardlink("x", "evil")],
        lambda d: os.readlink(d / "x") == "../outside/file",
        id="hardlink-to-symlink-links-the-symlink",
    ),
    pytest.param(
        [f.symlink("evil", "../outside/file"), f.fifo("evil")],
        lambda d: stat.S_ISFIFO((d / "evil").lstat().st_mode),
        id="fifo-replaces-symlink",
    ),
    pytest.param(
        [f.symlink("evil", "../outside"), f.whiteout("evil")],
        lambda d: (d / "evil").is_symlink(),
        id="whiteout-of-symlink-keeps-symlink",
    ),
    pytest.param(
        [f.symlink("evil", "../outside/file"), f.file("x", xattrs={"user.a": b"1"})],
        lambda d: xattrs_of(d / "x") == {"user.a": b"1"},
        id="symlink-left-alone",
    ),
    pytest.param(
        [f.raw("/abs/x", data=b"p"), f.raw("./dot/x"), f.raw("a/./b/../c", data=b"q")],
        lambda d: (
            (d / "abs/x").read_bytes() == b"p"
            and (d / "dot/x").exists()
            and (d / "a/c").read_bytes() == b"q"
            and not (d / "a/b").exists()
        ),
        id="names-rooted-at-the-layer",
    ),
]


@pytest.mark.parametrize(("entries", "check"), NOT_ESCAPES)
def test_entry_replacing_a_planted_symlink_stays_inside(
    box: Box, entries: list[f.Entry], check: Callable[[Path], bool]
) -> None:
    before = box.snapshot_outside()
    box.unpack(entries)
    assert check(box.dest)
    assert box.snapshot_outside() == before


def _fill(entry: f.Entry, box: Box) -> f.Entry:
    """Put the absolute path of outside/ into names that need it."""
    return f.Entry(
        **{
            **entry.__dict__,
            "name": entry.name.replace("{outside}", str(box.outside)),
            "linkname": entry.linkname.replace("{outside}", str(box.outside)),
        }
    )


# -- the stream ----------------------------------------------------------------


def test_stream_is_drained_past_the_end_of_archive_marker(box: Box) -> None:
    data = f.layer_tar([f.file("a", b"x" * 5000)], padding=300_000)
    stream = Stream(data)
    unpack_layer(stream, str(box.dest), IdMap(), layer=LAYER)  # type: ignore[arg-type]
    assert stream.remaining() == 0


def test_empty_layer_is_fine(box: Box) -> None:
    assert box.unpack(b"\0" * 1024) == UnpackResult(size_bytes=0)
    assert os.listdir(box.dest) == []


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(f.layer_tar([f.file("a", b"x" * 100_000)])[:50_000], id="truncated-data"),
        pytest.param(f.layer_tar([f.file("a", b"x"), f.file("b")])[:700], id="truncated-header"),
        pytest.param(f.layer_tar([f.file("a", b"x")])[:600], id="truncated-padding"),
        pytest.param(b"\x1f\x8b this is gzip, not tar" * 40, id="garbage"),
        pytest.param(b"", id="empty-stream"),
    ],
)
def test_corrupt_tar_is_an_unpack_error(box: Box, data: bytes) -> None:
    with pytest.raises(UnpackError, match=f"^unpack layer {LAYER}: "):
        box.unpack(data)


@pytest.mark.parametrize(
    "error",
    [
        zlib.error("invalid stored block lengths"),
        EOFError("compressed file ended"),
        OSError(5, "EIO"),
    ],
    ids=["zlib", "eof", "oserror"],
)
def test_stream_read_failure_is_an_unpack_error(box: Box, error: BaseException) -> None:
    stream = Stream(f.layer_tar([f.file("a", b"x" * 100_000)])[:60_000], fail=error)
    with pytest.raises(UnpackError, match=f"^unpack layer {LAYER}: "):
        unpack_layer(stream, str(box.dest), IdMap(), layer=LAYER)  # type: ignore[arg-type]


def test_verification_error_from_the_stream_passes_through(box: Box) -> None:
    failure = VerificationError("layer sha256:feedface: diff_id mismatch")
    stream = Stream(f.layer_tar([f.file("a")]), fail=failure)
    with pytest.raises(VerificationError) as caught:
        unpack_layer(stream, str(box.dest), IdMap(), layer=LAYER)  # type: ignore[arg-type]
    assert caught.value is failure


@pytest.mark.parametrize(
    "layer",
    [
        [f.file("a"), f.file("a/b")],
        [f.symlink("evil", "/"), f.file("evil/x")],
        [f.file("d/e/f"), f.hardlink("x", "nope")],
    ],
    ids=["not-a-directory", "symlink", "missing-hardlink-target"],
)
def test_failed_unpack_leaks_no_file_descriptors(box: Box, layer: list[f.Entry]) -> None:
    before = open_fds()
    with pytest.raises(UnpackError):
        box.unpack(layer)
    assert open_fds() == before


def test_unpack_of_many_directories_leaks_no_file_descriptors(box: Box) -> None:
    before = open_fds()
    box.unpack([f.file(f"d{i}/e{i % 7}/f") for i in range(300)])
    assert open_fds() == before
    assert len(os.listdir(box.dest)) == 300


def test_hardlink_to_a_missing_target_is_an_error(box: Box) -> None:
    with pytest.raises(UnpackError, match="entry x: hardlink target nope is not in this layer"):
        box.unpack([f.hardlink("x", "nope")])


def test_symlinked_parent_error_names_the_symlink(box: Box) -> None:
    with pytest.raises(UnpackError, match="entry evil/x: parent evil is a symlink"):
        box.unpack([f.symlink("evil", "real"), f.directory("real"), f.file("evil/x")])


def test_entry_below_a_non_directory_is_refused(box: Box) -> None:
    with pytest.raises(UnpackError, match="entry f/pipe: parent f is not a directory"):
        box.unpack([f.file("f"), f.fifo("f/pipe")])


# -- against GNU tar -----------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[object, ...]]:
    found: dict[str, tuple[object, ...]] = {}
    inode_names: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted([*dirnames, *filenames]):
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = path.lstat()
            first = inode_names.setdefault(st.st_ino, rel)
            found[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                st.st_mtime_ns,
                os.readlink(path) if path.is_symlink() else None,
                path.read_bytes() if stat.S_ISREG(st.st_mode) else None,
                xattrs_of(path),
                first,
            )
    return found


def test_result_matches_gnu_tar(box: Box, tmp_path: Path) -> None:
    layer = [
        f.directory("etc", mode=0o750, mtime=1111),
        f.file("etc/passwd", b"root:x:0:0\n", mode=0o644, mtime=2222),
        f.file("etc/shadow", b"secret", mode=0o640, gid=42),
        f.directory("usr/bin", mode=0o755, mtime=3333),
        f.file(
            "usr/bin/ping", b"\x7fELF", mode=0o4755, xattrs={"security.capability": CAP_NET_RAW}
        ),
        f.file("usr/bin/tool", b"t" * 70_000, mode=0o2711, uid=1000, gid=1000),
        f.hardlink("usr/bin/tool2", "usr/bin/tool"),
        f.symlink("usr/bin/sh", "busybox", mtime=4444),
        f.symlink("lib", "usr/lib"),
        f.directory("tmp", mode=0o1777),
        f.fifo("tmp/fifo", mode=0o600),
        f.file("home/u/notes", b"n", uid=1000, gid=1000, xattrs={"user.tag": b"v"}),
        f.directory("home", mode=0o755, mtime=5555),
    ]
    data = f.layer_tar(layer)
    reference = tmp_path / "reference"
    reference.mkdir()
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--same-owner",
            "-xpf",
            "-",
            "-C",
            str(reference),
        ],
        input=data,
        check=True,
    )
    box.unpack(data)
    mine, theirs = _tree(box.dest), _tree(reference)
    # GNU tar creates missing parents with the umask and the current time; only
    # usr/ and home/u/ here, whose metadata the layer leaves open.
    for implicit in ("usr", "home/u"):
        del mine[implicit], theirs[implicit]
    assert mine == theirs


# -- base directory (Cloud Foundry's annotation, Garden's droplets) -------------


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    """The layer below: /home (0711 root) and /home/vcap (0750, 2000:2001), /usr -> symlink."""
    below = tmp_path / "parent"
    (below / "home/vcap").mkdir(parents=True)
    os.chmod(below / "home", 0o711)
    os.chmod(below / "home/vcap", 0o750)
    os.chown(below / "home/vcap", 2000, 2001)
    (below / "usr").symlink_to("home")
    (below / "etc").write_text("not a directory")
    return below


def _unpack_under(box: Box, parent: Path, base: str, entries: list[f.Entry]) -> UnpackResult:
    data = f.layer_tar(entries)
    return unpack_layer(
        Stream(data),  # type: ignore[arg-type]
        str(box.dest),
        IDENTITY,
        layer=LAYER,
        base_directory=base,
        parent=str(parent),
    )


def test_base_directory_parents_copy_mode_and_owner_of_the_layer_below(box, parent):
    _unpack_under(box, parent, "/home/vcap", [f.file("app/run", b"x", uid=2000)])
    home, vcap = (box.dest / "home").stat(), (box.dest / "home/vcap").stat()
    assert (stat.S_IMODE(home.st_mode), home.st_uid) == (0o711, 0)
    assert (stat.S_IMODE(vcap.st_mode), vcap.st_uid, vcap.st_gid) == (0o750, 2000, 2001)
    assert (box.dest / "home/vcap/app/run").read_bytes() == b"x"
    assert sorted(os.listdir(box.dest)) == ["home"]


def test_root_entry_of_the_layer_sets_the_base_directory(box, parent):
    _unpack_under(box, parent, "/home/vcap", [f.directory(".", mode=0o700, uid=3000)])
    vcap = (box.dest / "home/vcap").stat()
    assert (stat.S_IMODE(vcap.st_mode), vcap.st_uid) == (0o700, 3000)


def test_whiteouts_and_hardlinks_resolve_under_the_base_directory(box, parent):
    _unpack_under(
        box,
        parent,
        "/home/vcap",
        [
            f.file("a", b"a"),
            f.hardlink("b", "./a"),
            f.whiteout(".profile"),
            f.directory("d"),
            f.opaque("d"),
        ],
    )
    assert (box.dest / "home/vcap/b").stat().st_ino == (box.dest / "home/vcap/a").stat().st_ino
    wh = (box.dest / "home/vcap/.profile").lstat()
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert xattrs_of(box.dest / "home/vcap/d") == {"trusted.overlay.opaque": b"y"}
    assert not (box.dest / ".profile").exists() and not (box.dest / "a").exists()


BASE_REFUSALS = [
    ("/home/nobody", [f.file("x")], "base directory not found in parent layer: /home/nobody"),
    ("/usr/vcap", [f.file("x")], "/usr is a symlink in the parent layer"),
    ("/etc/x", [f.file("x")], "/etc is not a directory in the parent layer"),
    ("/home/vcap", [f.file("../escape")], "path escapes the layer"),
    ("/home/vcap", [f.file("a"), f.hardlink("b", "../vcap/a")], "escapes the layer"),
    ("/home/vcap", [f.file(".")], "cannot replace the base directory"),
]


@pytest.mark.parametrize(
    ("base", "entries", "message"), BASE_REFUSALS, ids=[m for _, _, m in BASE_REFUSALS]
)
def test_base_directory_refusals(box, parent, base, entries, message):
    before = box.snapshot_outside()
    with pytest.raises(UnpackError, match=message.replace(".", r"\.")):
        _unpack_under(box, parent, base, entries)
    assert box.snapshot_outside() == before
