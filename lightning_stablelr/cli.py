"""The ``stablelr`` command line.

.. code-block:: console

    $ stablelr report lightning_logs/version_0              # aligned summary table
    $ stablelr report lightning_logs/version_0 --json       # machine-readable (NaN -> null)
    $ stablelr report lightning_logs/version_0 --png run.png
    $ stablelr report lightning_logs --merge                # one run resumed into version_0, version_1, ...

Exit codes: 0 on success, 2 on a usage error or a run that cannot be reported on (the message,
prefixed ``stablelr: error:``, goes to stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

PROG = "stablelr"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: ``stablelr report RUN_DIR [--png FILE] [--json]``."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect training runs made with lightning-stablelr."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    report = commands.add_parser(
        "report",
        help="summarize a run's TensorBoard event files",
        description="Summarize the stability of a run from its TensorBoard event files: a verdict in plain "
        "words (healthy, overfitting and the lr cut it caused, guard actions, divergence), then lr start and "
        "end, gap history, certified rate, worst barrier, equiconnectedness, sharpness against "
        "threshold and probe overhead.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR",
                        help="directory holding events.out.tfevents.* files (searched recursively)")
    report.add_argument("--png", metavar="FILE", default=None, help="also write a one-page dashboard PNG")
    report.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    report.add_argument("--merge", action="store_true",
                        help="merge event files from several directories as one resumed run (default: refuse)")
    return parser


def _report(run_dir: str, png: str | None, as_json: bool, merge: bool = False) -> int:
    from lightning_stablelr.report import format_report, load_run, summarize, summary_to_json, write_dashboard

    run = load_run(run_dir, merge=merge)
    summary = summarize(run)
    if png is not None:
        write_dashboard(run, png)
    if as_json:
        print(summary_to_json(summary))
        if png is not None:
            # stdout stays pure JSON.
            print(f"dashboard written to {png}", file=sys.stderr)
    else:
        print(format_report(summary))
        if png is not None:
            print(f"dashboard written to {png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``) and return the exit code.

    Contract: returns 0 on success; 2 for argparse usage errors and for a
    :class:`~lightning_stablelr.report.ReportError`, whose message is printed to stderr as
    ``stablelr: error: <message>``. ``--help`` returns 0.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        # argparse exits on usage errors (2) and on --help (0); return the code so that callers
        # (and tests) never see SystemExit from main().
        code = exit_request.code
        return code if isinstance(code, int) else 2
    from lightning_stablelr.report import ReportError

    try:
        return _report(args.run_dir, args.png, args.json, args.merge)
    except ReportError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `stablelr report RUN | head`: the reader left; stop quietly like other Unix tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
