"""The cron entry for scheduled cleans: not a BOSH template, so jinja2 renders it.

It lands in ``/etc/cron.d``, outside the job directory BOSH manages, so
pre-start writes it from the checked schedule each time it runs.
"""

from __future__ import annotations

CRON_FILE = "grootfs-py-clean"  # cron ignores files in cron.d whose names have dots

_TEMPLATE = """\
# Installed by the grootfs job's pre-start ({{ job_dir }}): collects unused
# layers in both stores. {{ job_dir }}/bin/clean holds a lock (a run never
# starts while another is going) and a deadline ({{ deadline }} s).
SHELL=/bin/sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin
{{ schedule }} root {{ job_dir }}/bin/clean >>{{ log_dir }}/scheduled-clean.log 2>&1
"""


def render(*, schedule: str, job_dir: str, log_dir: str, deadline: int) -> str:
    import jinja2

    env = jinja2.Environment(
        autoescape=False,  # a crontab, not HTML
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.from_string(_TEMPLATE).render(
        schedule=schedule, job_dir=job_dir, log_dir=log_dir, deadline=deadline
    )
