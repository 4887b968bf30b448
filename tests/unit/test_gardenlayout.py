"""The test helper that writes Garden's layout: it must match shared/docs/garden-cell.md."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from urllib.parse import quote

import gardenlayout as g


def _blob(layout: Path, digest: str) -> dict:
    return json.loads((layout / "blobs/sha256" / digest.split(":")[1]).read_bytes())


def test_layout_is_the_one_garden_writes_for_preloaded_plus_layer(tmp_path: Path) -> None:
    stack = tmp_path / "packages/cflinuxfs4/rootfs.tar"
    stack.parent.mkdir(parents=True)
    stack.write_bytes(b"tar")
    droplet = "https://blobstore:4443/read/droplet?md5=x&expires=1"
    rootfs = (
        f"preloaded+layer:{stack}?layer={quote(droplet, safe='')}"
        f"&layer_path=/home/vcap&layer_digest={'d' * 64}"
    )
    layout = tmp_path / "depot/handle/image"
    image = g.write_from_rootfs_url(str(layout), rootfs)

    base = hashlib.sha256(f"{stack}-{os.stat(stack).st_mtime_ns}".encode()).hexdigest()
    assert image.url == f"oci://{layout}"
    assert image.stack_chain_id == f"sha256:{base}"
    assert sorted(os.listdir(layout)) == ["blobs", "index.json"]  # no oci-layout file
    index = json.loads((layout / "index.json").read_bytes())
    (desc,) = index["manifests"]
    assert desc["size"] == 0
    manifest = _blob(layout, desc["digest"])
    assert manifest["config"]["size"] == 0
    config = _blob(layout, manifest["config"]["digest"])
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert config["rootfs"]["diff_ids"] == [f"sha256:{base}", f"sha256:{'d' * 64}"]
    stack_layer, droplet_layer = manifest["layers"]
    assert stack_layer == {
        "mediaType": "application/vnd.oci.image.layer.v1.tar",
        "digest": f"sha256:{base}",
        "size": 0,
    }
    assert os.readlink(layout / "blobs/sha256" / base) == str(stack)
    assert droplet_layer == {
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": f"sha256:{'d' * 64}",
        "size": 0,
        "urls": [droplet],
        "annotations": {g.BASE_DIRECTORY_ANNOTATION: "/home/vcap"},
    }
    assert not (layout / "blobs/sha256" / ("d" * 64)).exists()
