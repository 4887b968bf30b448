import pytest

from grootfs_py import config
from grootfs_py.errors import ConfigError, InvalidArgumentError


def test_missing_file_is_invalid_config_path(tmp_path):
    with pytest.raises(ConfigError, match=r"^invalid config path"):
        config.load(str(tmp_path / "nope.yml"))


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("store: [unclosed", id="unparsable"),
        pytest.param("- a\n- b\n", id="top-level-list"),
        pytest.param("store: 5\n", id="store-not-string"),
        pytest.param("create: 3\n", id="section-not-mapping"),
        pytest.param("create:\n  disk_limit_size_bytes: lots\n", id="size-not-int"),
        pytest.param("create:\n  with_clean: 1\n", id="bool-as-int"),
        pytest.param("create:\n  insecure_registries: r:5000\n", id="list-as-string"),
    ],
)
def test_bad_file_is_invalid_config_file(text):
    with pytest.raises(ConfigError, match=r"^invalid config file"):
        config.parse(text)


def test_every_contract_key_is_read():
    text = """
store: /s
log_level: debug
log_file: /l.log
metron_endpoint: 127.0.0.1:3457
newuidmap_bin: /u
newgidmap_bin: /g
create:
  with_clean: true
  without_mount: true
  disk_limit_size_bytes: 10
  exclude_image_from_quota: true
  skip_layer_validation: true
  insecure_registries: [ "r.local:5000" ]
  clean_log_file: /c.log
clean:
  threshold_bytes: 7
init:
  store_size_bytes: 99
  with_direct_io: true
"""
    c = config.parse(text)
    assert (c.store, c.log_level, c.log_file, c.metron_endpoint) == (
        "/s",
        "debug",
        "/l.log",
        "127.0.0.1:3457",
    )
    assert (c.newuidmap_bin, c.newgidmap_bin) == ("/u", "/g")
    assert c.create == config.CreateConfig(True, True, 10, True, True, ("r.local:5000",), "/c.log")
    assert c.clean.threshold_bytes == 7
    assert c.init == config.InitConfig(99, True)


def test_unknown_keys_are_ignored():
    assert config.parse("store: /s\nsomething_new: 1\ncreate:\n  also_new: x\n").store == "/s"


def test_empty_file_gives_defaults():
    assert config.parse("") == config.Config()


def test_flags_override_file_values_and_none_keeps_them():
    c = config.parse("store: /file\ncreate:\n  disk_limit_size_bytes: 5\n")
    c = c.override(store="/flag", log_file=None).override("create", disk_limit_size_bytes=None)
    assert c.store == "/flag"
    assert c.create.disk_limit_size_bytes == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "create:\n  disk_limit_size_bytes: -1\n",
            "invalid argument: disk limit cannot be negative",
        ),
        ("clean:\n  threshold_bytes: -1\n", "invalid argument: clean threshold cannot be negative"),
        ("log_level: loud\n", "invalid argument: log level `loud`"),
    ],
)
def test_bad_values_fail_validation(text, message):
    with pytest.raises(InvalidArgumentError) as err:
        config.parse(text).validate()
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_a_file_reads_alike_whatever_its_line_ends(tmp_path, newline):
    path = tmp_path / "c.yml"
    text = "store: /s\nlog_level: error\ncreate:\n  insecure_registries:\n  - r:5000\n"
    path.write_bytes(text.replace("\n", newline).encode())
    c = config.load(str(path))
    assert (c.store, c.log_level, c.create.insecure_registries) == ("/s", "error", ("r:5000",))


def test_a_json_file_is_read(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"store": "/s\u00e9", "create": {"with_clean": true}}', encoding="utf-8")
    c = config.load(str(path))
    assert (c.store, c.create.with_clean) == ("/s\u00e9", True)
