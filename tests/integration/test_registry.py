"""create docker://... against a real registry (Debian's docker-registry on loopback)."""

import json
import os

import pytest

import registry as r
from registry import PASSWORD, USER

INSECURE = (
    "This registry is insecure. To pull images from this registry, "
    "please use the --insecure-registry option."
)
AUTH_FAILED = "authorization failed: username and password are invalid"


def _create(grootfs, store, url, image_id, *flags, **kwargs):
    result = grootfs("create", *flags, url, image_id, store=store, **kwargs)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"stdout must be one JSON line, got {result.stdout!r}"
    return json.loads(lines[0])


def _fails(grootfs, store, url, *flags, **kwargs):
    result = grootfs("create", *flags, url, "doomed", store=store, check=False, **kwargs)
    assert result.returncode == 1, result.stdout
    assert not os.path.exists(os.path.join(store, "images", "doomed"))
    return result.stdout.strip()


def _volumes(store):
    return sorted(os.listdir(os.path.join(store, "volumes")))


def _read(spec, path):
    with open(os.path.join(spec["root"]["path"], path), "rb") as fh:
        return fh.read()


def test_registry_image_becomes_a_rootfs_with_its_env(grootfs, dir_store, open_registry, pushed):
    host = open_registry.host
    spec = _create(
        grootfs, dir_store, f"docker://{host}/busybox:latest", "c1", "--insecure-registry", host
    )
    assert spec["process"]["env"] == ["PATH=/bin", "GREETING=from-the-registry"]
    assert os.access(os.path.join(spec["root"]["path"], "bin/busybox"), os.X_OK)
    image = pushed.images["busybox:latest"]
    assert _volumes(dir_store) == [c.split(":")[1] for c in image.chain_ids]


def test_second_create_fetches_the_manifest_but_no_blob(grootfs, dir_store, open_registry, pushed):
    host = open_registry.host
    url = f"docker://{host}/multi:v1"
    layers = len(pushed.images["multi:v1"].layer_digests)
    before = len(open_registry.blob_gets("multi")), len(open_registry.manifest_gets("multi"))
    _create(grootfs, dir_store, url, "first", "--insecure-registry", host)
    middle = len(open_registry.blob_gets("multi")), len(open_registry.manifest_gets("multi"))
    assert middle[0] - before[0] == layers + 1  # every layer and the config, once
    _create(grootfs, dir_store, url, "second", "--insecure-registry", host)
    after = len(open_registry.blob_gets("multi")), len(open_registry.manifest_gets("multi"))
    assert after[0] == middle[0], "a warm create must not request any blob"
    assert after[1] == middle[1] + 1, "a warm create must still fetch the manifest (tags move)"


def test_layers_download_concurrently_and_bounded(grootfs, dir_store, proxy, pushed):
    # Every blob is trickled over about a second, so overlapping downloads are seen.
    proxy.reset(trickle_blobs=100)
    spec = _create(
        grootfs, dir_store, f"docker://{proxy.host}/five:v1", "c", "--insecure-registry", proxy.host
    )
    assert _read(spec, "which") == b"five"
    assert len(_volumes(dir_store)) == 5
    assert 2 <= proxy.faults.max_inflight_blobs <= 3


@pytest.mark.parametrize(
    ("reference", "present", "absent"),
    [
        ("docker2:v1", "bin/busybox", "which"),  # Docker schema 2 manifest
        # The indexes' arm64 entries are the "multi" image, with a file "which".
        ("multiarch:oci", "bin/busybox", "which"),  # OCI index: the amd64 entry
        ("dockerlist:v1", "bin/busybox", "which"),  # Docker manifest list: the amd64 entry
        ("zstd:v1", "which", "bin/busybox"),  # zstd layers
    ],
)
def test_every_manifest_kind_resolves(
    grootfs, dir_store, open_registry, reference, present, absent
):
    host = open_registry.host
    spec = _create(
        grootfs, dir_store, f"docker://{host}/{reference}", "c", "--insecure-registry", host
    )
    assert os.path.exists(os.path.join(spec["root"]["path"], present))
    assert not os.path.exists(os.path.join(spec["root"]["path"], absent))


def test_index_without_the_host_platform_names_what_it_offers(grootfs, dir_store, open_registry):
    host = open_registry.host
    out = _fails(
        grootfs, dir_store, f"docker://{host}/multiarch:elsewhere", "--insecure-registry", host
    )
    assert out == "no image for platform linux/amd64: the index offers linux/arm64, linux/s390x"


def test_digest_reference_pins_the_manifest(grootfs, dir_store, open_registry, pushed):
    host = open_registry.host
    digest = pushed.images["busybox:latest"].manifest_digest
    spec = _create(
        grootfs, dir_store, f"docker://{host}/busybox@{digest}", "c", "--insecure-registry", host
    )
    assert spec["process"]["env"][1] == "GREETING=from-the-registry"
    missing = "sha256:" + "0" * 64
    out = _fails(
        grootfs, dir_store, f"docker://{host}/busybox@{missing}", "--insecure-registry", host
    )
    assert out.startswith(f"image docker://{host}/busybox@{missing} not found")


@pytest.mark.parametrize(
    ("reference", "named"),
    [("nothere:latest", "nothere:latest"), ("busybox:no-such-tag", "busybox:no-such-tag")],
)
def test_missing_repository_or_tag_is_named(grootfs, dir_store, open_registry, reference, named):
    host = open_registry.host
    out = _fails(grootfs, dir_store, f"docker://{host}/{reference}", "--insecure-registry", host)
    assert out.startswith(f"image docker://{host}/{named} not found: manifest")


def test_plain_http_registry_needs_the_insecure_flag_or_config(grootfs, dir_store, open_registry):
    host = open_registry.host
    assert _fails(grootfs, dir_store, f"docker://{host}/busybox") == INSECURE
    config = {"store": dir_store, "create": {"insecure_registries": [host]}}
    result = grootfs("create", f"docker://{host}/busybox", "c", config=config)
    assert json.loads(result.stdout)["process"]["env"][0] == "PATH=/bin"


def test_diff_id_mismatch_from_a_registry_leaves_no_layer(grootfs, dir_store, open_registry):
    host = open_registry.host
    out = _fails(grootfs, dir_store, f"docker://{host}/bad-diffid:v1", "--insecure-registry", host)
    assert out == "diffID digest mismatch"
    # The good lower layer may stay (it is complete); nothing half-done may.
    assert not [v for v in _volumes(dir_store) if "incomplete" in v]
    assert len(_volumes(dir_store)) <= 1


def _no_secret_anywhere(grootfs_log, *outputs):
    logged = grootfs_log.read_text() if grootfs_log.exists() else ""
    for text in (logged, *outputs):
        assert PASSWORD not in text
        assert "Basic " not in text and "Bearer " not in text


def _needs_and_checks_credentials(grootfs, store, host):
    """No credentials, then wrong ones, fail as the contract says; right ones create.

    Returns every output, for the check that no secret leaked into any of them.
    """
    url = f"docker://{host}/busybox"
    flags = ("--insecure-registry", host)
    missing = _fails(grootfs, store, url, *flags)
    assert missing.startswith(f"authorization failed: registry {host} requires credentials")
    wrong = _fails(grootfs, store, url, *flags, "--username", USER, "--password", "nope")
    assert wrong == AUTH_FAILED
    result = grootfs(
        "create", *flags, "--username", USER, "--password", PASSWORD, url, "c", store=store
    )
    assert json.loads(result.stdout)["process"]["env"][1] == "GREETING=from-the-registry"
    return missing, wrong, result.stdout, result.stderr


def test_htpasswd_registry_takes_basic_credentials(
    grootfs, dir_store, htpasswd_registry, grootfs_log
):
    outputs = _needs_and_checks_credentials(grootfs, dir_store, htpasswd_registry.host)
    _no_secret_anywhere(grootfs_log, *outputs)


def test_token_registry_takes_a_bearer_token_from_its_realm(
    grootfs, dir_store, token_registry, grootfs_log
):
    issued = len(token_registry.tokens.issued)
    outputs = _needs_and_checks_credentials(grootfs, dir_store, token_registry.registry.host)
    granted = [t for t in token_registry.tokens.issued[issued:] if t["sub"] == USER]
    assert granted and granted[-1]["access"] == [
        {"type": "repository", "name": "busybox", "actions": ["pull"]}
    ]
    assert granted[-1]["aud"] == "test-registry"
    _no_secret_anywhere(grootfs_log, *outputs)


def test_self_signed_registry_is_refused_unless_trusted_or_insecure(
    grootfs, dir_store, tls_registry, monkeypatch
):
    host = tls_registry.registry.host
    url = f"docker://{host}/busybox"
    assert _fails(grootfs, dir_store, url) == INSECURE
    spec = _create(grootfs, dir_store, url, "insecure", "--insecure-registry", host)
    assert spec["process"]["env"][1] == "GREETING=from-the-registry"
    # Verified TLS: OpenSSL's default trust (here pointed at the test CA) is what counts.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_registry.ca.cert))
    spec = _create(grootfs, dir_store, url, "verified")
    assert spec["process"]["env"][1] == "GREETING=from-the-registry"


def test_registry_asking_for_a_client_certificate_gets_one_from_the_config(
    grootfs, dir_store, mtls_registry, monkeypatch, tmp_path
):
    host = mtls_registry.registry.host
    url = f"docker://{host}/busybox"
    monkeypatch.setenv("SSL_CERT_FILE", str(mtls_registry.ca.cert))
    certs = tmp_path / "certs"
    without = _fails(grootfs, dir_store, url)
    assert without == (
        f"pull {host}/busybox:latest: registry {host}: TLS: the registry requires a client "
        "certificate and none is configured for it (create.remote_layer_client_certificates_path)"
    )
    (certs / host).mkdir(parents=True)
    os.link(mtls_registry.client.cert, certs / host / "client.cert")
    os.link(mtls_registry.client.key, certs / host / "client.key")
    config = {"store": dir_store, "create": {"remote_layer_client_certificates_path": str(certs)}}
    result = grootfs("create", url, "c", config=config)
    assert json.loads(result.stdout)["process"]["env"][1] == "GREETING=from-the-registry"


def test_top_level_certificates_serve_every_registry_and_empty_files_are_unset(
    grootfs, dir_store, mtls_registry, tls_registry, tmp_path, monkeypatch
):
    # The BOSH job installs grootfs.tls.{cert,key,ca_cert} as remote-layer.cert, .key and
    # .crt (Garden's names) in one directory for all registries and remote layers.
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    client, ca = mtls_registry.client, mtls_registry.ca
    certs = tmp_path / "tls"
    certs.mkdir()
    (certs / "remote-layer.cert").write_bytes(client.cert.read_bytes())
    (certs / "remote-layer.key").write_bytes(client.key.read_bytes())
    (certs / "remote-layer.crt").write_bytes(ca.cert.read_bytes())
    config = {"store": dir_store, "create": {"remote_layer_client_certificates_path": str(certs)}}
    mtls_url = f"docker://{mtls_registry.registry.host}/busybox"
    spec = _create(grootfs, None, mtls_url, "mtls", config=config)
    assert spec["process"]["env"][1] == "GREETING=from-the-registry"

    (certs / "remote-layer.cert").write_text("")
    (certs / "remote-layer.key").write_text("")
    tls_url = f"docker://{tls_registry.registry.host}/busybox"
    spec = _create(grootfs, None, tls_url, "tls", config=config)  # trusted through remote-layer.crt
    assert spec["process"]["env"][1] == "GREETING=from-the-registry"
    (certs / "remote-layer.crt").write_text("")
    assert _fails(grootfs, dir_store, tls_url, config=config) == INSECURE


def test_blob_redirect_is_followed_without_the_registry_credentials(
    grootfs, dir_store, htpasswd_registry, open_registry
):
    # Docker Hub answers blob GETs with a redirect to a CDN; the credentials are the
    # registry's and must not go along. The "CDN" here is the open registry.
    front, cdn = r.FaultProxy(htpasswd_registry.host), r.FaultProxy(open_registry.host)
    with r.running(front, cdn):
        front.reset(redirect_blobs_to=cdn.host)
        flags = ("--insecure-registry", front.host, "--username", USER, "--password", PASSWORD)
        spec = _create(grootfs, dir_store, f"docker://{front.host}/busybox", "c", *flags)
    assert spec["process"]["env"][1] == "GREETING=from-the-registry"
    assert "/v2/busybox/manifests/latest" in front.faults.authorized
    assert cdn.blob_requests()  # the config and the layer came from the redirect target
    assert cdn.faults.authorized == []


def test_egress_proxy_from_the_environment_carries_http_and_tls(
    grootfs, dir_store, open_registry, tls_registry, monkeypatch
):
    tls_host, http_host = tls_registry.registry.host, open_registry.host
    with r.running(egress := r.ForwardProxy()):
        monkeypatch.setenv("https_proxy", egress.host)
        monkeypatch.setenv("HTTP_PROXY", f"http://{egress.host}")
        monkeypatch.setenv("SSL_CERT_FILE", str(tls_registry.ca.cert))
        spec = _create(grootfs, dir_store, f"docker://{tls_host}/busybox", "tls")
        assert spec["process"]["env"][1] == "GREETING=from-the-registry"
        assert f"CONNECT {tls_host}" in egress.seen  # TLS to the registry, through a tunnel
        insecure = ("--insecure-registry", http_host)
        _create(grootfs, dir_store, f"docker://{http_host}/busybox", "http", *insecure)
        assert f"GET http://{http_host}/v2/busybox/manifests/latest" in egress.seen

        egress.seen.clear()
        monkeypatch.setenv("no_proxy", "registry.example.com, 127.0.0.1")
        _create(grootfs, dir_store, f"docker://{http_host}/busybox", "direct", *insecure)
        assert egress.seen == []


def test_warm_create_of_a_local_image_loads_no_http_code(
    grootfs, dir_store, open_registry, pushed, monkeypatch
):
    layout = pushed.images["busybox:latest"]
    grootfs("create", layout.ref, "cold", store=dir_store)
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    oci = grootfs("create", layout.ref, "warm", store=dir_store).stderr
    host = open_registry.host
    docker = grootfs(
        "create", "--insecure-registry", host, f"docker://{host}/busybox", "d", store=dir_store
    ).stderr

    def imported(stderr):
        return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if "|" in line}

    http_modules = {"http.client", "ssl", "grootfs_py.sources.registry"}
    assert http_modules <= imported(docker)  # the check sees them when they are there
    assert not http_modules & imported(oci)
