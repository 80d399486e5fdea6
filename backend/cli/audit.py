"""`headstart suspects PROJECT` and `headstart export PROJECT --min-precision P`: the label audit on the command line.

Both read what the audit job stored after the last training (`backend.loop.audit`) through
`backend.loop.audit_report`; neither changes a label. Exit codes as the admin commands: 0 done, 1 not found or
nothing to export, 2 configuration or connection problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from backend.cli.admin import EXIT_OK, EXIT_REFUSED, Output, _run
from backend.common.settings import Settings


AUDIT_COMMANDS = ("suspects", "export")


def add_audit_commands(commands) -> dict[str, Callable[[Settings, argparse.Namespace], int]]:
    """Add `suspects` and `export` to `headstart`'s subparsers; returns name → handler for backend.cli."""
    suspects = commands.add_parser("suspects", help="labels of PROJECT that are probably wrong, most likely first")
    suspects.add_argument("project")
    suspects.add_argument("--json", action="store_true", help="print JSON instead of tables")
    export = commands.add_parser("export", help="human labels plus machine labels above a precision (JSON lines)")
    export.add_argument("project")
    export.add_argument("--min-precision", type=_precision, required=True, metavar="P",
                        help="precision the machine labels must reach out of fold (on folds of the served head's "
                             "recipe), e.g. 0.98")
    export.add_argument("--output", "-o", help="file to write (default: standard output)")
    export.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    return dict(zip(AUDIT_COMMANDS, (_run(_suspects), _run(_export))))


def _precision(raw: str) -> float:
    value = float(raw)
    if not 0.5 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{raw} is not a precision in [0.5, 1), e.g. 0.98")
    return value


def _suspects(services, args, out: Output) -> int:
    from backend.admin.views import known_project
    from backend.loop.audit_report import coverage_line, suspects

    project = known_project(services, args.project)
    views = suspects(services, project)
    if out.as_json:
        out.json({"project": project, "controls": views})
        return EXIT_OK
    for view in views:
        head = f"project {project}, control {view['control']}"
        if not view["judged"]:
            out.line(f"{head}: {view['reason']}")
        else:
            out.table(f"{head} ({view['model_version']}): {len(view['suspects'])} suspect label(s) of "
                      f"{view['labels']}, most likely wrong first",
                      ["rank", "task", "given", "p(given)", "suggested", "p(suggested)", "open in Label Studio"],
                      [[s["rank"], s["task"], ", ".join(s["given"]), f"{s['given_probability']:.3f}",
                        ", ".join(s["suggested"]), f"{s['suggested_probability']:.3f}", s["link"] or ""]
                       for s in view["suspects"]])
        if view["conflicts"]:
            out.table(f"{head}: near-duplicates with different labels",
                      ["tasks", "labels", "cosine"],
                      [[" & ".join(map(str, c["tasks"])), " vs ".join(", ".join(l) for l in c["labels"]),
                        f"{c['cosine']:.3f}"] for c in view["conflicts"]])
        line = coverage_line(view.get("auto_accept"))
        if line:
            out.line(f"{head}: {line}")
    return EXIT_OK


def _export(services, args, out: Output) -> int:
    from backend.admin.errors import Refused
    from backend.admin.views import known_project
    from backend.common.errors import NotEnoughLabels
    from backend.loop.audit_report import export_lines

    project = known_project(services, args.project)
    counts = {"human": 0, "machine": 0}
    lines = export_lines(services, project, min_precision=args.min_precision)
    try:
        first = next(lines, None)  # raises before a file is created when there is nothing to export
    except NotEnoughLabels as exc:
        raise Refused(str(exc)) from None
    if first is None:
        raise Refused(f"Project {project} has no labels to export yet.")
    stream = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for record in (first, *lines):
            counts[record["label_source"]] += 1
            stream.write(json.dumps(record, sort_keys=True) + "\n")
    finally:
        if args.output:
            stream.close()
    print(f"headstart: exported {counts['human']} human-labeled and {counts['machine']} machine-labeled tasks "
          f"(min precision {args.min_precision})", file=sys.stderr)
    return EXIT_OK if counts["human"] + counts["machine"] else EXIT_REFUSED
