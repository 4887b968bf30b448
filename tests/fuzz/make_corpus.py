"""Write the seed corpus under tests/fuzz/corpus/ (run once; the files are committed).

    python tests/fuzz/make_corpus.py

Seeds are small valid (and a few near-valid) inputs of every kind the
parsers know, so mutation starts from deep inside each format.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import imagefactory as f  # noqa: E402

CORPUS = os.path.join(HERE, "corpus")
DIGEST = "sha256:" + "ab" * 32


def _tar_seeds() -> dict[str, bytes]:
    seeds = {
        "files": f.layer_tar(
            [f.directory("etc"), f.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mode=0o600)]
        ),
        "links": f.layer_tar(
            [
                f.file("a", b"x" * 700),
                f.hardlink("b", "a"),
                f.symlink("c", "/a"),
                f.symlink("d", "../../outside"),
            ]
        ),
        "special": f.layer_tar([f.fifo("p"), f.chardev("null"), f.blockdev("loop0")]),
        "whiteouts": f.layer_tar(
            [f.directory("d"), f.whiteout("d/gone"), f.opaque("d"), f.whiteout("top")]
        ),
        "pax": f.layer_tar(
            [
                f.file("x", b"1", mtime="1600000000.123456789", xattrs={"user.k": b"\x00\xff"}),
                f.raw("n", pax={"path": "pax/long/" + "n" * 120, "uid": "70000"}),
                f.raw("l", f.tarfile.SYMTYPE, pax={"linkpath": "t" * 150}),
            ]
        ),
        "ids": f.layer_tar([f.file("owned", uid=65534, gid=2**21 + 1)]),
        "escape": f.layer_tar([f.raw("../up"), f.raw("/abs"), f.raw("a/../../b")]),
    }
    for fmt, name in ((tarfile.GNU_FORMAT, "gnu"), (tarfile.USTAR_FORMAT, "ustar")):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=fmt) as t:
            info = tarfile.TarInfo("dir/" + "long" * 30 if fmt == tarfile.GNU_FORMAT else "p/" * 60)
            info.size = 3
            info.uid = 2**30 if fmt == tarfile.GNU_FORMAT else 1
            t.addfile(info, io.BytesIO(b"abc"))
            info = tarfile.TarInfo("ln")
            info.type, info.linkname = (
                tarfile.SYMTYPE,
                "target/" * (20 if fmt == tarfile.GNU_FORMAT else 5),
            )
            t.addfile(info)
        seeds[name] = out.getvalue()
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}
    ) as t:
        t.addfile(tarfile.TarInfo("g"))
    seeds["pax-global"] = out.getvalue()
    seeds["v7-dir"] = _v7_dir()
    return seeds


def _v7_dir() -> bytes:
    info = tarfile.TarInfo("olddir/")
    info.type = tarfile.AREGTYPE
    return info.tobuf(tarfile.USTAR_FORMAT).replace(b"ustar\x0000", b"\0" * 8) + bytes(1024)


def _descriptor(media_type: str, **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": DIGEST, "size": 42, **extra}


def _json_seeds() -> dict[str, bytes]:
    docs: dict[str, object] = {
        "index": {
            "schemaVersion": 2,
            "mediaType": f.MEDIA_INDEX,
            "manifests": [
                _descriptor(f.MEDIA_MANIFEST, annotations={f.REF_NAME: "latest"}),
                _descriptor(
                    f.MEDIA_MANIFEST,
                    platform={"os": "linux", "architecture": "amd64"},
                    annotations={f.REF_NAME: "v1"},
                ),
            ],
        },
        "manifest": {
            "schemaVersion": 2,
            "mediaType": f.MEDIA_MANIFEST,
            "config": _descriptor(f.MEDIA_CONFIG),
            "layers": [_descriptor(f.MEDIA_LAYER["gzip"]), _descriptor(f.MEDIA_LAYER["zstd"])],
        },
        "docker-manifest": {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": _descriptor("application/vnd.docker.container.image.v1+json"),
            "layers": [_descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip")],
        },
        "docker-list": {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
            "manifests": [
                _descriptor(f.MEDIA_MANIFEST, platform={"os": "linux", "architecture": "arm64"}),
                _descriptor(f.MEDIA_MANIFEST, platform={"os": "linux", "architecture": "amd64"}),
            ],
        },
        "config": {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin", "A=b"]},
            "rootfs": {"type": "layers", "diff_ids": [DIGEST, "sha512:" + "cd" * 64]},
        },
        "schema1": {"schemaVersion": 1, "name": "x", "fsLayers": []},
        "no-media-type": {"schemaVersion": 2, "layers": [], "config": {}},
    }
    return {name: json.dumps(doc, indent=1).encode() for name, doc in docs.items()}


REFERENCES = [
    "busybox",
    "cfgarden/empty:v0.1.1",
    "/library/ubuntu:22.04",
    "127.0.0.1:5000/team/app:latest",
    "localhost/a_b__c-d",
    "registry.example.com:443/x/y/z@" + DIGEST,
    "[::1]:5000/img:tag",
    "docker.io/library/debian@sha512:" + "ef" * 64,
    "/abs/layout:tag",
]

CONFIGS = {
    "yaml": b"""store: /var/vcap/data/grootfs/store/unprivileged
log_level: debug
log_file: /var/vcap/sys/log/grootfs.log
newuidmap_bin: /usr/bin/newuidmap
create:
  with_clean: true
  without_mount: false
  disk_limit_size_bytes: 1048576
  insecure_registries: [127.0.0.1:5000, "reg.local"]
  skip_layer_validation: false
clean:
  threshold_bytes: 1024
init:
  store_size_bytes: 1073741824
""",
    "json": b'{"store": "/s", "create": {"without_mount": true}, "clean": {"deadline_seconds": 9}}',
    "anchors": b"a: &x {threshold_bytes: 5}\nclean: *x\n",
}


def main() -> None:
    shutil.rmtree(CORPUS, ignore_errors=True)
    kinds = {
        "tar": _tar_seeds(),
        "image-json": _json_seeds(),
        "reference": {f"ref-{i}": r.encode() for i, r in enumerate(REFERENCES)},
        "config": CONFIGS,
        "json-bounds": {**_json_seeds(), "deep": b"[" * 100 + b"]" * 100},
    }
    for kind, seeds in kinds.items():
        os.makedirs(os.path.join(CORPUS, kind))
        for name, data in seeds.items():
            with open(os.path.join(CORPUS, kind, name), "wb") as out:
                out.write(data)


if __name__ == "__main__":
    main()
