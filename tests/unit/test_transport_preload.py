"""The CA context a fork server loads once is taken by one transport, and only under its CAs."""

import ssl

from grootfs_py.sources import transport


def test_the_preloaded_context_is_taken_once(monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    transport.preload_default_context()
    context = transport._take_preloaded()
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert transport._take_preloaded() is None  # a second transport builds its own


def test_a_caller_naming_other_cas_does_not_get_the_servers(monkeypatch, tmp_path):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    transport.preload_default_context()
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "other.pem"))
    assert transport._take_preloaded() is None
