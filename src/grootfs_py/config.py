"""Configuration: the YAML file Garden's job writes, with flags on top.

The frozen records mirror the file's keys one for one, so the BOSH
templates, this module and the contract use the same names. They are
NamedTuples rather than dataclasses: Garden runs us for every container, and
building a dataclass costs a millisecond each, plus importing inspect.
A config file that is JSON (which is also YAML) is read with the json module
alone; the YAML parser is imported only for files that need it. Loading never exits; it
raises :class:`ConfigError` or :class:`InvalidArgumentError` with the
contract's messages.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from grootfs_py.errors import ConfigError, InvalidArgumentError

DEFAULT_STORE = "/var/lib/grootfs/store"
# A real config file is a few hundred bytes; a bigger one is not a config file.
MAX_CONFIG_BYTES = 1 << 20
LOG_LEVELS = ("debug", "info", "error", "fatal")


class CreateConfig(NamedTuple):
    with_clean: bool = False
    without_mount: bool = False
    disk_limit_size_bytes: int = 0
    exclude_image_from_quota: bool = False
    skip_layer_validation: bool = False
    insecure_registries: tuple[str, ...] = ()
    clean_log_file: str = ""
    remote_layer_client_certificates_path: str = ""
    # This project's key, beyond GrootFS's: mount the overlay with "volatile"
    # (see overlay.mount); false keeps GrootFS's fully synced upper.
    volatile_rootfs: bool = True


class CleanConfig(NamedTuple):
    threshold_bytes: int = 0
    deadline_seconds: int = 600  # a whole clean gives up after this long


class InitConfig(NamedTuple):
    store_size_bytes: int = 0
    with_direct_io: bool = False


class Config(NamedTuple):
    store: str = DEFAULT_STORE
    log_level: str = "info"
    log_file: str = ""
    metron_endpoint: str = ""  # host:port of the loggregator agent's dropsonde UDP port
    newuidmap_bin: str = ""
    newgidmap_bin: str = ""
    create: CreateConfig = CreateConfig()
    clean: CleanConfig = CleanConfig()
    init: InitConfig = InitConfig()

    def validate(self) -> Config:
        """Reject values no command can work with; return self for chaining."""
        if self.log_level not in LOG_LEVELS:
            raise InvalidArgumentError(
                f"invalid argument: log level `{self.log_level}` is not one of "
                + ", ".join(LOG_LEVELS)
            )
        if self.create.disk_limit_size_bytes < 0:
            raise InvalidArgumentError("invalid argument: disk limit cannot be negative")
        if self.clean.threshold_bytes < 0:
            raise InvalidArgumentError("invalid argument: clean threshold cannot be negative")
        if self.clean.deadline_seconds <= 0:
            raise InvalidArgumentError("invalid argument: clean deadline must be positive")
        if self.init.store_size_bytes < 0:
            raise InvalidArgumentError("invalid argument: store size cannot be negative")
        if not self.store:
            raise InvalidArgumentError("invalid argument: store path is empty")
        return self

    def override(self, section: str | None = None, **values: Any) -> Config:
        """A copy with the given non-None values replaced (flags beat the file)."""
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return self
        if section is None:
            return self._replace(**values)
        inner = getattr(self, section)._replace(**values)
        return self._replace(**{section: inner})


_SECTIONS: dict[str, type[Any]] = {
    "create": CreateConfig,
    "clean": CleanConfig,
    "init": InitConfig,
}


def _coerce(where: str, value: Any, default: Any) -> Any:
    """Check one value against the type of its default; YAML gives us the rest."""
    if value is None:
        return default
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    if ok:
        return value
    raise ConfigError(f"invalid config file: `{where}` has the wrong type")


def _build(cls: type[Any], data: dict[str, Any], prefix: str) -> Any:
    defaults = cls()
    values: dict[str, Any] = {}
    for name in cls._fields:
        if name not in data:
            continue
        default = getattr(defaults, name)
        if name in _SECTIONS and prefix == "":
            section = data[name]
            if section is None:
                continue
            if not isinstance(section, dict):
                raise ConfigError(f"invalid config file: `{name}` must be a mapping")
            values[name] = _build(_SECTIONS[name], section, name + ".")
        else:
            values[name] = _coerce(prefix + name, data[name], default)
    # Unknown keys are ignored on purpose: newer job templates may add keys.
    return cls(**values)


def _load_yaml(text: str) -> Any:
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"invalid config file: larger than {MAX_CONFIG_BYTES} bytes")
    if text.lstrip().startswith("{"):
        from grootfs_py import jsonload

        if jsonload.too_deep(text):
            raise ConfigError(
                f"invalid config file: nested deeper than {jsonload.MAX_DEPTH} levels"
            )
        import json

        try:
            return json.loads(text)
        except ValueError:
            pass  # YAML flow mappings look like JSON but need not be JSON
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise ConfigError(f"invalid config file: {first}") from None


def parse(text: str) -> Config:
    """Parse the YAML (or JSON) text of a config file."""
    data = _load_yaml(text)
    if data is None:
        return Config()
    if not isinstance(data, dict):
        raise ConfigError("invalid config file: top level must be a mapping")
    config: Config = _build(Config, data, "")
    return config


def load(path: str | None) -> Config:
    """Read the config file at *path*, or the defaults when no path is given."""
    if not path:
        return Config()
    from grootfs_py.fsutil import open_regular

    try:
        # A FIFO or device given as the config must not block the command.
        with open_regular(path) as f:
            text = f.read(MAX_CONFIG_BYTES + 1).decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"invalid config path: {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"invalid config file: {path}: not UTF-8") from None
    return parse(text)
