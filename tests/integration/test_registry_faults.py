"""A misbehaving registry: refused connections, 5xx, resets mid-blob, stalls, corruption.

The faults come from a proxy on loopback in front of the real registry.
"""

import json
import os
import time

import registry as r


def _create(grootfs, store, proxy, reference="multi:v1", image_id="c", check=True):
    return grootfs(
        "create",
        "--insecure-registry",
        proxy.host,
        f"docker://{proxy.host}/{reference}",
        image_id,
        store=store,
        check=check,
    )


def _nothing_half_done(store):
    volumes = os.listdir(os.path.join(store, "volumes"))
    assert not [v for v in volumes if "incomplete" in v]
    assert not os.path.exists(os.path.join(store, "images", "c"))


def test_refused_connection_is_retried_then_named(grootfs, dir_store):
    host = f"127.0.0.1:{r.free_port()}"
    start = time.monotonic()
    result = grootfs(
        "create",
        "--insecure-registry",
        host,
        f"docker://{host}/x",
        "c",
        store=dir_store,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout.strip() == (
        f"pull {host}/x:latest: registry {host}: get manifest latest: "
        "connection refused (tried 4 times)"
    )
    assert time.monotonic() - start >= 3  # backoff 0.5 + 1 + 2 s between the tries


def test_transient_5xx_is_retried(grootfs, dir_store, proxy):
    proxy.reset(refuse_status=503, status_count=2)
    result = _create(grootfs, dir_store, proxy)
    assert json.loads(result.stdout)["root"]["path"].endswith("/images/c/rootfs")
    manifests = [s for s in proxy.faults.seen if "/manifests/" in s]
    assert len(manifests) == 3  # two 503s, then the answer


def test_persistent_5xx_fails_naming_the_registry(grootfs, dir_store, proxy):
    proxy.reset(refuse_status=502, status_count=1000)
    result = _create(grootfs, dir_store, proxy, check=False)
    assert result.returncode == 1
    assert result.stdout.strip() == (
        f"pull {proxy.host}/multi:v1: registry {proxy.host}: get manifest v1: "
        "HTTP 502 (tried 4 times)"
    )
    _nothing_half_done(dir_store)


def test_reset_mid_blob_resumes_with_a_range_request(grootfs, dir_store, proxy):
    proxy.reset(reset_blobs=1)
    _create(grootfs, dir_store, proxy)
    ranged = [s for s in proxy.blob_requests() if s.endswith("-") and "bytes=" in s]
    assert len(ranged) == 1, proxy.faults.seen


def test_reset_mid_blob_restarts_when_the_registry_ignores_range(grootfs, dir_store, proxy):
    proxy.reset(reset_blobs=1, ignore_range=True)
    spec = json.loads(_create(grootfs, dir_store, proxy).stdout)
    with open(os.path.join(spec["root"]["path"], "which"), "rb") as fh:
        assert fh.read() == b"multi"
    # The retry asked for the rest; the proxy sent the whole blob (200), which the
    # client skipped to where it stopped: the digests above checked every byte.
    assert len([s for s in proxy.blob_requests() if "bytes=" in s]) == 1


def test_blob_reset_on_every_try_fails_and_leaves_no_layer(grootfs, dir_store, proxy):
    proxy.reset(reset_blobs=1000)
    result = _create(grootfs, dir_store, proxy, check=False)
    assert result.returncode == 1
    assert result.stdout.startswith(f"pull {proxy.host}/multi:v1: registry {proxy.host}: ")
    assert "connection reset" in result.stdout and "(tried 4 times)" in result.stdout
    assert "download layer sha256:" in result.stdout
    _nothing_half_done(dir_store)


def test_stalled_blob_times_out_and_resumes(grootfs, dir_store, proxy, monkeypatch):
    monkeypatch.setenv("GROOTFS_REGISTRY_TIMEOUT", "1")
    proxy.reset(stall_blobs=1, stall_seconds=4)
    start = time.monotonic()
    _create(grootfs, dir_store, proxy)
    assert time.monotonic() - start < 4
    assert [s for s in proxy.blob_requests() if "bytes=" in s]


def test_slow_but_moving_registry_is_waited_for(grootfs, dir_store, proxy, monkeypatch):
    monkeypatch.setenv("GROOTFS_REGISTRY_TIMEOUT", "1")
    proxy.reset(trickle_blobs=1000)  # each blob in 20 pieces, 50 ms apart
    _create(grootfs, dir_store, proxy)
    assert not [s for s in proxy.blob_requests() if "bytes=" in s]


def test_corrupted_image_config_fails_before_any_layer(grootfs, dir_store, proxy):
    proxy.reset(corrupt_blobs=1000, min_blob_bytes=0)
    result = _create(grootfs, dir_store, proxy, reference="busybox:latest", check=False)
    assert result.returncode == 1
    # The image config is checked too, before any layer is fetched.
    assert result.stdout.strip().endswith(": digest mismatch")
    assert "image config sha256:" in result.stdout
    _nothing_half_done(dir_store)
    assert os.listdir(os.path.join(dir_store, "volumes")) == []


def test_corrupted_layer_blob_fails_with_the_contract_message(grootfs, dir_store, proxy, pushed):
    # One byte of the big layer flipped; the small top layer and the config are left alone.
    proxy.reset(corrupt_blobs=1000)
    result = _create(grootfs, dir_store, proxy, reference="zstd:v1", check=False)
    assert result.stdout.strip() == "layerID digest mismatch"
    _nothing_half_done(dir_store)
    bottom = pushed.images["zstd:v1"].chain_ids[0].split(":")[1]
    assert bottom not in os.listdir(os.path.join(dir_store, "volumes"))
