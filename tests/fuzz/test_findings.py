"""Every fuzz finding, replayed: each input once made a target fail, and must not again.

Inputs that need a whole create (a store, a layout) are integration tests in
tests/integration/test_hostile_input.py; these are the parser-level ones.
"""

from __future__ import annotations

import pytest
import targets

import imagefactory as f

FINDINGS = [
    # Issue 13's campaign: a hardlink target forging a second stdout line.
    ("tar", f.layer_tar([f.hardlink("l", 'nope\n{"ociVersion":"1.0.2"}\x1b[2J')])),
    # Issue 13's campaign: 100,000 nested arrays or objects, RecursionError.
    ("image-json", b"[" * 100_000 + b"]" * 100_000),
    ("image-json", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
    ("json-bounds", b"[" * 100_000),
    ("config", b"{" * 100_000),
    # make fuzz, reference: a tag beside a digest does not print back (the digest wins);
    # the target's round-trip property was too strict, the parser is right.
    ("reference", b"registry.exa256:ababababababyz@sha256:" + b"ab" * 32),
    # make fuzz, create: a ref.name annotation that is a list, listed among the tags: TypeError.
    (
        "image-json",
        b'{"manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": '
        b'"sha256:' + b"8f" * 32 + b'", "size": 418, "annotations": '
        b'{"org.opencontainers.image.ref.name": ["latest"]}}]}',
    ),
]


@pytest.mark.parametrize(("target", "data"), FINDINGS)
def test_finding_stays_fixed(target, data):
    targets.TARGETS[target](data)
