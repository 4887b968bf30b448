"""Which proxy the environment names for a registry: pure functions of the environment."""

import pytest

from grootfs_py.sources.transport import proxy_for

PROXY = "http://proxy.corp:3128"


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch):
    for name in ("http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "proxied"),
    [
        ("", "registry.example.com", None, True),
        ("example.com", "registry.example.com", None, False),
        (".example.com", "registry.example.com", None, False),
        ("example.com", "example.com", 443, False),
        ("example.com", "notexample.com", None, True),
        ("registry.example.com:5000", "registry.example.com", 5000, False),
        ("registry.example.com:5000", "registry.example.com", 443, True),
        ("10.0.0.0/8", "10.20.30.40", 5000, False),
        ("10.0.0.0/8", "192.168.1.1", None, True),
        ("10.0.0.0/8", "registry.example.com", None, True),
        ("fd00::/8", "fd00::1", None, False),
        ("other.org, *", "registry.example.com", None, False),
        (" other.org , EXAMPLE.COM ", "Registry.Example.com", None, False),
    ],
)
def test_no_proxy_entries_decide_which_hosts_go_direct(monkeypatch, no_proxy, host, port, proxied):
    monkeypatch.setenv("https_proxy", PROXY)
    monkeypatch.setenv("no_proxy", no_proxy)
    assert proxy_for("https", host, port) == (PROXY if proxied else None)


@pytest.mark.parametrize(
    ("env", "scheme", "expected"),
    [
        ({"https_proxy": "proxy:3128"}, "https", "http://proxy:3128"),
        ({"HTTPS_PROXY": PROXY}, "https", PROXY),
        ({"https_proxy": PROXY}, "http", None),
        ({"http_proxy": PROXY}, "http", PROXY),
        ({}, "https", None),
    ],
)
def test_proxy_is_chosen_by_scheme_in_either_case(monkeypatch, env, scheme, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert proxy_for(scheme, "registry.example.com", None) == expected
