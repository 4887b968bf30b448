"""cli.quick_args (argparse skipped for Garden's stats and delete) must agree with argparse."""

import random

import pytest

from grootfs_py import cli
from grootfs_py.errors import InvalidArgumentError


def _argparse(argv):
    return cli.build_parser(cli.command_of(argv)).parse_args(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "/var/vcap/jobs/garden/config/grootfs_config.yml", "stats", "app-1"],
        ["--config", "/c.yml", "delete", "/store/images/app-1/rootfs"],
        ["stats", "x"],
        ["--store", "/s", "--log-level", "error", "--log-file", "/l", "delete", "x"],
        ["--metron-endpoint", "127.0.0.1:3457", "--config", "a", "--config", "b", "stats", "x"],
        ["--config", "", "stats", ""],
        ["--config", "c", "stats", "stats"],
    ],
)
def test_gardens_shapes_take_the_quick_path_and_agree(argv):
    quick = cli.quick_args(argv)
    assert quick is not None
    assert vars(quick) == vars(_argparse(argv))


@pytest.mark.parametrize(
    "argv",
    [
        ["--config=c", "stats", "x"],  # spelt with "="
        ["--conf", "c", "stats", "x"],  # abbreviated
        ["--config", "-5", "stats", "x"],  # a value argparse may read as a flag
        ["--log-level", "loud", "stats", "x"],  # not a choice: argparse's error
        ["stats", "-x"],
        ["stats"],
        ["stats", "x", "y"],
        ["--config"],
        ["stats", "--config", "c", "x"],
        ["create", "a", "b"],
        ["list"],
        ["--help"],
        [],
    ],
)
def test_anything_else_goes_to_argparse(argv):
    assert cli.quick_args(argv) is None


def test_random_argv_never_disagrees():
    tokens = [*cli._GLOBAL_FLAGS_WITH_VALUE, "stats", "delete", "list", "x", "", "-", "--", "-1"]
    tokens += ["info", "bogus", "--config=c", "--store=s", "a b", "--help"]
    rng = random.Random(10)
    quick_taken = 0
    for _ in range(5000):
        if rng.random() < 0.5:
            argv = [rng.choice(tokens) for _ in range(rng.randint(0, 7))]
        else:  # Garden's shape, with values (and so flags and commands) from the pool
            argv = []
            for _ in range(rng.randint(0, 3)):
                argv += [rng.choice(cli._GLOBAL_FLAGS_WITH_VALUE), rng.choice(tokens)]
            argv += [rng.choice(["stats", "delete"]), rng.choice(tokens)]
        quick = cli.quick_args(argv)
        if quick is None:
            continue
        quick_taken += 1
        try:
            expected = vars(_argparse(argv))
        except (InvalidArgumentError, SystemExit) as exc:
            pytest.fail(f"{argv}: quick path accepted what argparse rejects: {exc}")
        assert vars(quick) == expected, argv
    assert quick_taken > 300
