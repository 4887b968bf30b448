"""Configuration: the YAML file Garden's job writes, with flags on top.

The dataclasses mirror the file's keys one for one, so the BOSH templates,
this module and the contract use the same names. Loading never exits; it
raises :class:`ConfigError` or :class:`InvalidArgumentError` with the
contract's messages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from grootfs_py.errors import ConfigError, InvalidArgumentError

DEFAULT_STORE = "/var/lib/grootfs/store"
LOG_LEVELS = ("debug", "info", "error", "fatal")


@dataclass(frozen=True)
class CreateConfig:
    with_clean: bool = False
    without_mount: bool = False
    disk_limit_size_bytes: int = 0
    exclude_image_from_quota: bool = False
    skip_layer_validation: bool = False
    insecure_registries: tuple[str, ...] = ()
    clean_log_file: str = ""


@dataclass(frozen=True)
class CleanConfig:
    threshold_bytes: int = 0


@dataclass(frozen=True)
class InitConfig:
    store_size_bytes: int = 0
    with_direct_io: bool = False


@dataclass(frozen=True)
class Config:
    store: str = DEFAULT_STORE
    log_level: str = "info"
    log_file: str = ""
    metrics_endpoint: str = ""
    newuidmap_bin: str = ""
    newgidmap_bin: str = ""
    create: CreateConfig = field(default_factory=CreateConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    init: InitConfig = field(default_factory=InitConfig)

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
            return dataclasses.replace(self, **values)
        inner = dataclasses.replace(getattr(self, section), **values)
        return dataclasses.replace(self, **{section: inner})


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
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        default = getattr(defaults, f.name)
        if f.name in _SECTIONS and prefix == "":
            section = data[f.name]
            if section is None:
                continue
            if not isinstance(section, dict):
                raise ConfigError(f"invalid config file: `{f.name}` must be a mapping")
            values[f.name] = _build(_SECTIONS[f.name], section, f.name + ".")
        else:
            values[f.name] = _coerce(prefix + f.name, data[f.name], default)
    # Unknown keys are ignored on purpose: newer job templates may add keys.
    return cls(**values)


def parse(text: str) -> Config:
    """Parse the YAML text of a config file."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise ConfigError(f"invalid config file: {first}") from None
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
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"invalid config path: {path}: {exc.strerror}") from None
    return parse(text)
