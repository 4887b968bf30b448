"""``python -m grootfs_py.release prepare``: what the job's pre-start runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from grootfs_py.errors import GrootError
from grootfs_py.release.prepare import Paths, prepare


def main(argv: Sequence[str] | None = None) -> int:
    defaults = Paths()
    parser = argparse.ArgumentParser(prog="python -m grootfs_py.release")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("prepare", help="size both stores, write their configs and cron")
    cmd.add_argument("--job-dir", default=defaults.job_dir)
    cmd.add_argument("--data-dir", default=defaults.data_dir)
    cmd.add_argument("--cron-dir", default=defaults.cron_dir)
    cmd.add_argument("--log-dir", default=defaults.log_dir)
    args = parser.parse_args(argv)
    paths = Paths(
        job_dir=args.job_dir, data_dir=args.data_dir, cron_dir=args.cron_dir, log_dir=args.log_dir
    )
    try:
        prepare(paths)
    except GrootError as exc:
        print(f"prepare: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
