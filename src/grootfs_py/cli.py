"""The command line: the only place that reads argv, prints, and picks exit codes.

Garden parses stdout, so stdout carries exactly the command's result (or,
on failure, one line saying what went wrong) and logs go elsewhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from grootfs_py import log, metrics
from grootfs_py.config import Config
from grootfs_py.errors import GrootError, InvalidArgumentError

CREATE_USAGE = "invalid arguments - usage: create [options] <image> <id>"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise InvalidArgumentError(f"invalid arguments: {message}")


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter with a fixed width.

    argparse makes a formatter for every argument it adds, and without a
    width each one imports shutil to ask the terminal its size.
    """

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        super().__init__(prog, indent_increment, max_help_position, width or 100)


def _size(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not a whole number of bytes") from None


def _init_store_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store-size-bytes", type=_size)
    p.add_argument("--uid-mapping", action="append", default=[], metavar="NS:HOST:SIZE")
    p.add_argument("--gid-mapping", action="append", default=[], metavar="NS:HOST:SIZE")
    p.add_argument("--with-direct-io", action="store_true", default=None)


def _create_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disk-limit-size-bytes", type=_size)
    p.add_argument("--exclude-image-from-quota", action="store_true", default=None)
    p.add_argument("--insecure-registry", action="append", default=None)
    p.add_argument("--skip-layer-validation", action="store_true", default=None)
    p.add_argument("--with-clean", action="store_true")
    p.add_argument("--without-clean", action="store_true")
    p.add_argument("--threshold-bytes", type=_size)
    p.add_argument("--with-mount", action="store_true")
    p.add_argument("--without-mount", action="store_true")
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("args", nargs="*", metavar="<image> <id>")


def _image_argument(metavar: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("image", metavar=metavar)

    return add


def _clean_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold-bytes", type=_size)
    p.add_argument("--deadline-seconds", type=_size)


def _check_store_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repair", action="store_true")


def _no_arguments(p: argparse.ArgumentParser) -> None:
    pass


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    from grootfs_py.server import DEFAULT_SOCKET

    p.add_argument("--socket", default=DEFAULT_SOCKET, help="the unix socket to listen on")


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "init-store": ("create and mount the store", _init_store_arguments),
    "delete-store": ("delete every image and layer and the store", _no_arguments),
    "create": ("create a root filesystem", _create_arguments),
    "delete": ("unmount and remove an image", _image_argument("<id or rootfs path>")),
    "stats": ("disk usage of an image", _image_argument("<id>")),
    "list": ("list image paths", _no_arguments),
    "clean": ("remove layers no image uses", _clean_arguments),
    "capacity": ("the store's configured size", _no_arguments),
    "generate-volume-size-metadata": ("rebuild layer size records", _no_arguments),
    "check-quota": ("prove that the store enforces disk quotas", _no_arguments),
    "check-store": (
        "verify the store's invariants (--repair: fix what is safe)",
        _check_store_arguments,
    ),
    "serve": ("serve commands forked from one warm process (see grootfs-shim)", _serve_arguments),
}
_GLOBAL_FLAGS_WITH_VALUE = ("--config", "--store", "--log-level", "--log-file", "--metron-endpoint")


def command_of(argv: Sequence[str]) -> str | None:
    """The command named in *argv*, found without parsing it all."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in _GLOBAL_FLAGS_WITH_VALUE:
            i += 2
        elif token.partition("=")[0] in _GLOBAL_FLAGS_WITH_VALUE:
            i += 1
        elif token.startswith("-"):
            return None
        else:
            return token if token in COMMANDS else None
    return None


_PARSERS: dict[str | None, argparse.ArgumentParser] = {}


def warm_parsers() -> None:
    """Build every command's parser now: the fork server does, so its children need not.

    Each is also run once on a typical command line, so that argparse's
    regular expressions are compiled and cached here, not in every child.
    """
    import contextlib

    flags = ["--config", "c", "--store", "s", "--log-level", "info", "--log-file", "f"]
    for name in (*COMMANDS, None):
        parser = _PARSERS[name] = build_parser(name)
        for tail in (["x", "y"], ["x"], []):
            with contextlib.suppress(InvalidArgumentError):
                parser.parse_args([*flags, *([name] if name else []), *tail])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with *only*, just that command's part of it.

    Building every subcommand costs more than a warm create's real work
    (argparse formats and translates each argument as it is added), so a
    run that names a known command builds only that one. Help and errors
    for unknown commands get the whole parser.
    """
    parser = _Parser(
        prog="grootfs",
        description="Container root filesystems for Garden-runC.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--store", help="store path (overrides the config file)")
    parser.add_argument("--log-level", choices=("debug", "info", "error", "fatal"))
    parser.add_argument("--log-file", help="write JSON log lines here instead of stderr")
    parser.add_argument("--metron-endpoint", help="send metrics to this ip:port (dropsonde, UDP)")
    # An explicit prog spares argparse formatting a usage line to make one.
    commands = parser.add_subparsers(
        dest="command", metavar="command", parser_class=_Parser, prog="grootfs"
    )
    commands.required = True
    for name, (help_text, add_arguments) in COMMANDS.items():
        if only is None or name == only:
            add_arguments(commands.add_parser(name, help=help_text, formatter_class=_Formatter))
    return parser


def _configure(args: argparse.Namespace) -> Config:
    from grootfs_py import config as config_module

    config = config_module.load(args.config).override(
        store=args.store,
        log_level=args.log_level,
        log_file=args.log_file,
        metron_endpoint=args.metron_endpoint,
    )
    if args.command == "create":
        config = config.override(
            "create",
            disk_limit_size_bytes=args.disk_limit_size_bytes,
            exclude_image_from_quota=args.exclude_image_from_quota,
            skip_layer_validation=args.skip_layer_validation,
            insecure_registries=tuple(args.insecure_registry) if args.insecure_registry else None,
        )
        if args.with_clean and args.without_clean:
            raise InvalidArgumentError("with-clean and without-clean cannot be used together")
        if args.with_mount and args.without_mount:
            raise InvalidArgumentError("with-mount and without-mount cannot be used together")
        if args.with_clean or args.without_clean:
            config = config.override("create", with_clean=args.with_clean)
        if args.with_mount or args.without_mount:
            config = config.override("create", without_mount=args.without_mount)
        config = config.override("clean", threshold_bytes=args.threshold_bytes)
    elif args.command == "clean":
        config = config.override(
            "clean", threshold_bytes=args.threshold_bytes, deadline_seconds=args.deadline_seconds
        )
    elif args.command == "init-store":
        config = config.override(
            "init", store_size_bytes=args.store_size_bytes, with_direct_io=args.with_direct_io
        )
    return config.validate()


_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escaped(char: str) -> str:
    code = ord(char)
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for an undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def escape(text: str) -> str:
    """*text* with every character that could break or forge a stdout line made visible.

    Control characters (C0, DEL, C1), the Unicode line and paragraph
    separators, and lone surrogates (undecodable bytes of a name) become
    escapes, so a hostile entry name cannot add a line to stdout, move the
    cursor, or make the write fail.
    """
    if text.isprintable():  # the usual case, at C speed: none of those is printable
        return text
    import re

    return re.sub("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]", lambda m: _escaped(m[0]), text)


def _print(value: Any) -> None:
    """Write one line on stdout: a string (escaped) or a JSON value (ASCII-only)."""
    if isinstance(value, str):
        sys.stdout.write(escape(value) + "\n")
    else:
        sys.stdout.write(json.dumps(value, separators=(",", ":")) + "\n")


def _run(args: argparse.Namespace, config: Config) -> None:
    from grootfs_py.store import Store

    store = Store(
        config.store, newuidmap_bin=config.newuidmap_bin, newgidmap_bin=config.newgidmap_bin
    )
    command = args.command
    if command == "create":
        _create(args, config, store)
    elif command == "delete":
        from grootfs_py import images

        deleted = images.delete(store, args.image)
        if deleted is None:
            _print(f"Image `{args.image}` not found. Skipping delete.")
        else:
            _print(f"Image {deleted} deleted")
            if metrics.enabled():
                from grootfs_py import usage

                usage.send_layers(store)
    elif command == "stats":
        from grootfs_py import images

        _print(images.stats(store, args.image))
    elif command == "list":
        from grootfs_py import images

        paths = images.list_paths(store)
        for path in paths:
            _print(path)  # one line each, escaped
        if not paths:
            _print("Store empty")
    elif command == "clean":
        from grootfs_py import clean

        outcome = clean.clean(
            store,
            threshold_bytes=config.clean.threshold_bytes,
            deadline_seconds=config.clean.deadline_seconds,
        )
        _print(
            {
                "completed": "clean completed",
                "below threshold": "threshold not reached: skipping clean",
                # Not a failure: the store is being cleaned, by the other one.
                "already running": "clean already running",
            }[outcome]
        )
        if metrics.enabled() and outcome != "already running":
            from grootfs_py import usage

            usage.send_layers(store)
    elif command == "capacity":
        _print({"capacity": config.init.store_size_bytes})
    elif command == "init-store":
        from grootfs_py.idmap import IdMap, IdMapping

        idmap = IdMap.of(
            tuple(IdMapping.parse(m) for m in args.uid_mapping),
            tuple(IdMapping.parse(m) for m in args.gid_mapping),
        )
        store.init(
            size_bytes=config.init.store_size_bytes,
            idmap=idmap,
            direct_io=config.init.with_direct_io,
        )
    elif command == "delete-store":
        store.delete()
    elif command == "check-quota":
        store.check_quota()
    elif command == "check-store":
        from grootfs_py import checkstore
        from grootfs_py.errors import StoreError

        found = checkstore.check(store, repair=args.repair)
        for text, repaired in found:
            _print(f"{text} (repaired)" if repaired else text)
        left = sum(1 for _, repaired in found if not repaired)
        if left:
            raise StoreError(f"check store: {left} problem{'s' if left > 1 else ''} left")
    elif command == "generate-volume-size-metadata":
        from grootfs_py import volumes

        volumes.regenerate_sizes(store)
    elif command == "serve":
        from grootfs_py import server

        server.serve(args.socket)


def _create(args: argparse.Namespace, config: Config, store: Any) -> None:
    from grootfs_py import images, settle
    from grootfs_py.sources import SourceOptions

    if len(args.args) != 2:
        raise InvalidArgumentError(CREATE_USAGE)
    url, image_id = args.args
    options = images.CreateOptions(
        without_mount=config.create.without_mount,
        volatile_rootfs=config.create.volatile_rootfs,
        disk_limit_size_bytes=config.create.disk_limit_size_bytes,
        exclude_image_from_quota=config.create.exclude_image_from_quota,
        source=SourceOptions(
            skip_layer_validation=config.create.skip_layer_validation,
            insecure_registries=config.create.insecure_registries,
            username=args.username or "",
            password=args.password or "",
            client_certificates_path=config.create.remote_layer_client_certificates_path,
            cache_dir=store.join("meta", "image-configs"),
        ),
    )
    try:
        spec = images.create(store, url, image_id, options, settle_later=True)
    except BaseException:
        settle.detach(store)  # the layers it did make stay cached
        raise
    _print(spec)
    settle.detach(store)
    if config.create.with_clean:
        _spawn_clean(config, args.config)
    if metrics.enabled():
        from grootfs_py import usage

        usage.send_after_create(store, with_clean=config.create.with_clean)


def _spawn_clean(config: Config, config_path: str | None = None) -> None:
    """Start a clean that outlives us; the create has already answered Garden.

    This is the one child not run through proc.run: it must not be waited for.
    """
    import os
    import subprocess

    log_file = config.create.clean_log_file or config.log_file
    argv = [
        sys.executable,
        "-m",
        "grootfs_py",
        # The file too: its other keys (newuidmap_bin, newgidmap_bin) apply to the clean.
        *(["--config", config_path] if config_path else []),
        "--store",
        config.store,
        "--log-level",
        config.log_level,
    ]
    if log_file:
        argv += ["--log-file", log_file]
    if config.metron_endpoint:
        argv += ["--metron-endpoint", config.metron_endpoint]
    argv += [
        "clean",
        "--threshold-bytes",
        str(config.clean.threshold_bytes),
        "--deadline-seconds",
        str(config.clean.deadline_seconds),
    ]
    log.debug("starting detached clean", argv=argv)
    subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
        env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
    )


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    try:
        only = command_of(argv)
        parser = _PARSERS.get(only) or build_parser(only)
        args = parser.parse_args(argv)
        config = _configure(args)
        log.configure(config.log_level, config.log_file or None, command=args.command)
        if config.metron_endpoint:
            metrics.configure(config.metron_endpoint)
        _run(args, config)
    except GrootError as exc:
        message = str(exc)
        log.error("command failed", error=message)
        _print(message)
        return 1
    except KeyboardInterrupt:
        _print("interrupted")
        return 1
    except Exception as exc:
        # A bug or an input nothing foresaw: still one line for Garden, and
        # the traceback for whoever reads the log.
        import traceback

        line = f"internal error: {type(exc).__name__}: {exc}"
        log.error("internal error", error=line, trace=traceback.format_exc())
        _print(line)
        return 1
    finally:
        # After the answer: what was recorded goes out even when the command failed.
        metrics.SHARED_LOCKS.record_total()
        metrics.EXCLUSIVE_LOCKS.record_each()
        metrics.flush()
        log.close()
    return 0
