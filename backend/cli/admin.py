"""`headstart status|workers|queues|jobs|models|train|embed`: the admin, on the command line.

Reads and changes go through backend.admin.views / backend.admin.actions, the same functions the
/admin page calls, against the Redis named by REDIS_URL. Every command prints tables (or JSON with
--json). Exit codes: 0 done, 1 not found / refused / the job failed, 2 configuration or connection
problem (Redis unreachable, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

from backend.common.settings import Settings

EXIT_OK, EXIT_REFUSED, EXIT_CONFIG = 0, 1, 2
POLL_S = 0.5


def add_admin_commands(commands) -> dict[str, Callable[[Settings, argparse.Namespace], int]]:
    """Add the admin subcommands to `headstart`'s subparsers; returns name → handler for backend.cli."""
    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
        return parser

    command("status", "Redis, queues with depths, workers, projects with their current version")
    workers = command("workers", "list workers; `workers drain NAME` / `workers stop NAME` shut one down gracefully")
    workers.add_argument("action", nargs="?", choices=("drain", "stop"),
                         help="drain: finish the current job, take no new one, exit; stop: the same, and wait")
    workers.add_argument("name", nargs="?", help="worker name (see `headstart workers`)")
    workers.add_argument("--timeout", type=float, default=120.0, help="seconds `stop` waits (default 120)")
    queues = command("queues", "list queues; `queues suspend` / `queues resume` hold or release every worker")
    queues.add_argument("action", nargs="?", choices=("suspend", "resume"))
    jobs = command("jobs", "list jobs; `jobs retry ID|--failed`, `jobs cancel ID`, `jobs show ID`")
    jobs.add_argument("action", nargs="?", choices=("retry", "cancel", "show"))
    jobs.add_argument("job_id", nargs="?", help="job id (see `headstart jobs`)")
    jobs.add_argument("--failed", action="store_true", help="with retry: every failed job")
    jobs.add_argument("--status", help="list only jobs with this status (queued, started, failed, finished, ...)")
    models = command("models", "`models PROJECT`, `models promote PROJECT VERSION`, `models rollback PROJECT`")
    models.add_argument("words", nargs="+", metavar="PROJECT | promote PROJECT VERSION | rollback PROJECT")
    models.add_argument("--control", help="the Choices control, when the project has several")
    models.add_argument("--limit", type=int, default=None, help="versions per control to list (default 50, newest)")
    models.add_argument("--before", type=int, default=None, help="list versions numbered below this one (older pages)")
    train = command("train", "queue a training of PROJECT now (coalesced like webhook requests)")
    train.add_argument("project")
    train.add_argument("--wait", action="store_true", help="wait for the training job and print its outcome")
    forget = command("forget", "drop every piece of PROJECT's data from Redis (a project deleted in Label Studio)")
    forget.add_argument("project")
    forget.add_argument("--yes", action="store_true", help="really drop it (without: say what would happen)")
    embed = command("embed", "pre-compute embeddings of every task of PROJECT on the workers")
    embed.add_argument("project")
    embed.add_argument("--no-wait", action="store_true", help="queue the job and return")
    return {name: _run(handler) for name, handler in HANDLERS.items()}


def _run(handler):
    """Connect to Redis, run `handler`, print its result; map errors to exit codes."""
    def run(settings: Settings, args: argparse.Namespace) -> int:
        from redis.exceptions import RedisError

        from backend.admin.errors import NotFound, Refused
        from backend.common.errors import HeadstartError
        from backend.common.redis_conn import LOCAL_REDIS_URL, connect

        url = settings.redis_url or LOCAL_REDIS_URL
        try:
            redis = connect(url)
            redis.ping()
        except RedisError as exc:
            return _fail(f"Redis at {_redacted(url)} is unreachable ({exc}). Start Redis there or set REDIS_URL.",
                         EXIT_CONFIG)
        from backend.loop.services import build_services

        out = Output(as_json=args.json)
        try:
            return handler(build_services(settings, redis), args, out)
        except (NotFound, Refused) as exc:
            return _fail(str(exc), EXIT_REFUSED)
        except (UsageError, HeadstartError) as exc:
            return _fail(str(exc), EXIT_CONFIG)
        except RedisError as exc:
            return _fail(f"Redis at {_redacted(url)} failed ({exc}). Check that it is up and REDIS_URL is right.",
                         EXIT_CONFIG)
    return run


class UsageError(Exception):
    """The arguments do not make a command (exit 2, like argparse)."""


def _fail(message: str, code: int) -> int:
    print(f"headstart: {message}", file=sys.stderr)
    return code


def _redacted(url: str) -> str:
    from backend.admin.views import redacted

    return redacted(url)


class Output:
    """Tables (rich) on stdout, or the same data as JSON with --json."""

    def __init__(self, *, as_json: bool):
        from rich.console import Console

        self.as_json = as_json
        self.console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)

    def json(self, data) -> None:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))

    def table(self, title: str, columns: list[str], rows: list[list]) -> None:
        from rich.table import Table

        table = Table(title=title, title_justify="left", header_style="bold")
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*["" if cell is None else str(cell) for cell in row])
        self.console.print(table)

    def line(self, text: str) -> None:
        self.console.print(text, highlight=False)


# --- commands ------------------------------------------------------------------------------------

def _status(services, args, out: Output) -> int:
    from backend.admin import views

    data = views.status(services)
    if out.as_json:
        out.json(data)
        return EXIT_OK
    redis = data["redis"]
    out.line(f"Redis {redis['version']} at {redis['url']}: {redis['db_keys']} keys, {redis['used_memory']}")
    if data["suspended"]:
        out.line("[bold red]queues suspended[/]: workers take no jobs until `headstart queues resume`")
    _queue_table(out, data["queues"])
    out.table("Workers", ["name", "state", "host", "current job"],
              [[w["name"], w["state"], w["host"], w["current_job"]] for w in data["workers"]])
    out.table("Projects", ["project", "model_version", "controls", "labeled", "unlabeled", "current", "sampling"],
              [[p["project"], p["model_version"],
                ", ".join(f"{c['control']}: v{c['current']} of {c['versions']}" for c in p["controls"]),
                str(p["queue"]["labeled"]), str(p["queue"]["unlabeled"]), str(p["queue"]["current"]),
                p["queue"]["sampling"] + (f" ({p['queue']['note']})" if p["queue"]["note"] else "")]
               for p in data["projects"]])
    if data["killer_inputs"]:
        out.table("Inputs a worker died on (skipped once poison)", ["project", "task", "kills", "poison", "url"],
                  [[k["project"], k["task_id"], k["kills"], "yes" if k["poison"] else "no", k["url"][:80]]
                   for k in data["killer_inputs"]])
    for hint in data["deleted_project_hints"]:
        out.line(f"project {hint['project']}: PROJECT_DELETED received ({hint['state']}): {hint['message']}")
    for p in data["projects"]:
        for coverage in p.get("coverage") or []:
            out.line(f"project {p['project']}, control {coverage['control']}: {coverage['line']}")
    return EXIT_OK


def _queue_table(out: Output, queues: list[dict]) -> None:
    states = list(queues[0]["counts"]) if queues else []
    out.table("Queues", ["queue", *states, "workers"],
              [[q["name"], *[q["counts"][state] for state in states], q["workers"]] for q in queues])


def _workers(services, args, out: Output) -> int:
    from backend.admin import actions, views

    redis = services.redis
    if args.action:
        if not args.name:
            raise UsageError(f"`headstart workers {args.action}` needs a worker NAME (see `headstart workers`).")
        result = actions.drain_worker(redis, args.name)
        if args.action == "stop":
            with out.console.status(f"waiting for {args.name} to finish its job and exit"):
                result["stopped"] = actions.wait_until_gone(redis, args.name, timeout_s=args.timeout)
        _print_result(out, result, f"{args.name}: asked to finish its current job and exit")
        if args.action == "stop" and not result["stopped"]:
            return _fail(f"{args.name} is still running after {args.timeout:g} s (a long job?).", EXIT_REFUSED)
        return EXIT_OK
    data = views.workers(redis)
    if out.as_json:
        out.json(data)
        return EXIT_OK
    out.table("Workers", ["name", "host", "device", "backbone", "queues", "state", "current job", "last heartbeat",
                          "done", "failed"],
              [[w["name"], w["host"], _device(w["device"]), w["backbone"], ", ".join(w["queues"]), w["state"],
                w["current_job"], f"{w['last_heartbeat']} ({w['heartbeat_age_s']} s ago)", w["jobs_done"],
                w["jobs_failed"]] for w in data])
    return EXIT_OK


def _device(device: dict) -> str:
    memory = device.get("memory_bytes")
    return f"{device.get('name', '?')} {memory / 2**30:.1f} GiB" if memory else device.get("name", "?")


def _queues(services, args, out: Output) -> int:
    from backend.admin import actions, views

    redis = services.redis
    if args.action:
        result = actions.suspend_queues(redis) if args.action == "suspend" else actions.resume_queues(redis)
        _print_result(out, result, "queues suspended: workers finish their current job and take no new one"
                      if result["suspended"] else "queues resumed")
        return EXIT_OK
    data = {"queues": views.queues(redis), "suspended": views.suspended(redis)}
    if out.as_json:
        out.json(data)
        return EXIT_OK
    _queue_table(out, data["queues"])
    out.line("queues suspended" if data["suspended"] else "queues running")
    return EXIT_OK


def _jobs(services, args, out: Output) -> int:
    from backend.admin import actions, views

    redis = services.redis
    if args.action == "retry" and args.failed:
        result = actions.retry_failed(redis)
        _print_result(out, result, f"requeued {len(result['requeued'])} failed job(s)")
        return EXIT_OK
    if args.action and not args.job_id:
        raise UsageError(f"`headstart jobs {args.action}` needs a job ID (see `headstart jobs`)"
                         + (" or --failed" if args.action == "retry" else "") + ".")
    if args.action == "retry":
        _print_result(out, actions.retry_job(redis, args.job_id), f"{args.job_id}: queued again")
        return EXIT_OK
    if args.action == "cancel":
        _print_result(out, actions.cancel_job(redis, args.job_id), f"{args.job_id}: canceled")
        return EXIT_OK
    if args.action == "show":
        job = views.job(redis, args.job_id)
        if out.as_json:
            out.json(job)
        else:
            for key, value in job.items():
                if key != "traceback":
                    text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else value
                    out.line(f"[bold]{key}[/]: {text}")
            if job["traceback"]:
                out.console.print(job["traceback"], markup=False, highlight=False)
        return EXIT_OK
    data = [job for job in views.jobs(redis) if not args.status or job["status"] == args.status]
    if out.as_json:
        out.json(data)
        return EXIT_OK
    out.table("Jobs", ["id", "queue", "function", "project", "status", "worker", "started", "duration",
                       "error / outcome"],
              [[j["id"], j["queue"], (j["function"] or "?").rsplit(".", 1)[-1], j["project"], j["status"], j["worker"],
                j["started_at"], f"{j['duration_s']:.1f} s" if j["duration_s"] is not None else "", _outcome(j)]
               for j in data])
    return EXIT_OK


def _outcome(job: dict) -> str:
    if job["error"]:
        return job["error"]
    if job["progress"]:
        return f"{job['progress']['done']}/{job['progress']['total']}"
    result = job["result"] if isinstance(job["result"], dict) else {}
    return result.get("model_version") or result.get("status") or ""


def _models(services, args, out: Output) -> int:
    from backend.admin import actions, views

    words = args.words
    if words[0] == "promote":
        if len(words) != 3 or not words[2].isdigit():
            raise UsageError("usage: headstart models promote PROJECT VERSION [--control C]")
        result = actions.promote(services, words[1], int(words[2]), control=args.control)
        _print_result(out, result, f"project {result['project']} now serves {result['model_version']} "
                                   f"(was {result['previous_model_version']})")
        return EXIT_OK
    if words[0] == "rollback":
        if len(words) != 2:
            raise UsageError("usage: headstart models rollback PROJECT [--control C]")
        result = actions.rollback(services, words[1], control=args.control)
        _print_result(out, result, f"project {result['project']}: {result['control']}-v{result['rolled_back']} "
                                   f"rolled back; now serves {result['model_version']}")
        return EXIT_OK
    if len(words) != 1:
        raise UsageError("usage: headstart models PROJECT | models promote PROJECT VERSION | models rollback PROJECT")
    data = views.models(services, words[0], limit=max(args.limit or views.VERSIONS_SHOWN, 1), before=args.before)
    if out.as_json:
        out.json(data)
        return EXIT_OK
    out.line(f"project {data['project']} serves [bold]{data['model_version']}[/]")
    for control in data["controls"]:
        out.table(f"{control['control']} (current v{control['current']})",
                  ["version", "", "status", "why", "labels", "cv acc.", "train acc.", "trainable", "frozen",
                   "backbone", "created"],
                  [[v["name"], "current" if v["current"] else "", v["status"], v["reason"], v["labels"],
                    _fraction(v["cv_accuracy"]), _fraction(v["train_accuracy"]), v["trainable_parameters"],
                    v["non_trainable_parameters"], v["backbone"], v["created_at"]] for v in control["versions"]])
        if control["older"]:
            out.line(f"the newest {len(control['versions'])} of {control['version_count']} versions; older ones: "
                     f"headstart models {data['project']} --before {control['older']}")
    return EXIT_OK


def _fraction(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else ""


def _train(services, args, out: Output) -> int:
    from backend.admin import actions

    result = actions.train(services, args.project)
    if not args.wait or result["job"] is None:
        _print_result(out, result, f"project {result['project']}: training {result['outcome']} (job {result['job']})")
        return EXIT_OK
    with out.console.status(f"training project {result['project']} (job {result['job']})"):
        job = _wait_for_job(services.redis, result["job"], on_progress=None)
    return _finished(out, job)


def _forget(services, args, out: Output) -> int:
    from backend.loop import project_data
    from backend.loop.predictor import project_id

    project = project_id(args.project)
    if not args.yes:
        raise UsageError(f"`headstart forget {project} --yes` drops project {project}'s versions, labels, task "
                         "index, queued jobs and the embeddings only it uses, for good (Label Studio keeps its data).")
    result = project_data.forget_project(services.redis, project)
    _print_result(out, result, f"project {project}: {result['keys']} keys and {result['embeddings']} embeddings "
                               f"dropped, {result['jobs_cancelled']} queued jobs cancelled")
    return EXIT_OK


def _embed(services, args, out: Output) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from backend.admin import actions

    result = actions.embed(services, args.project)
    if args.no_wait:
        _print_result(out, result, f"project {result['project']}: embedding queued (job {result['job']})")
        return EXIT_OK
    if out.as_json:
        return _finished(out, _wait_for_job(services.redis, result["job"], on_progress=None))
    columns = (TextColumn("embedding project " + result["project"]), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=out.console) as progress:
        bar = progress.add_task("embed", total=None)

        def show(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total)

        job = _wait_for_job(services.redis, result["job"], on_progress=show)
    return _finished(out, job)


def _wait_for_job(redis, job_id: str, *, on_progress) -> dict:
    """Poll a job until it is over (finished, failed, stopped or canceled) and, when it reports progress, until
    that progress is complete (an embedding pass goes on in chunk jobs after its job finished); feed the progress
    to `on_progress`."""
    from backend.admin import views

    while True:
        job = views.job(redis, job_id)
        progress = job["progress"]
        if on_progress is not None and progress:
            on_progress(progress["done"], progress["total"])
        over = job["status"] in ("finished", "failed", "stopped", "canceled")
        complete = not progress or progress["done"] + progress["failed"] >= progress["total"]
        if over and (complete or job["status"] != "finished"):
            return job
        time.sleep(POLL_S)


def _finished(out: Output, job: dict) -> int:
    if out.as_json:
        out.json(job)
    elif job["status"] == "finished":
        out.line(f"job {job['id']} finished in {job['duration_s']:.1f} s: {json.dumps(job['result'], default=str)}")
    if job["status"] != "finished":
        return _fail(f"job {job['id']} {job['status']}: {job['error'] or ''} (`headstart jobs show {job['id']}`)",
                     EXIT_REFUSED)
    return EXIT_OK


def _print_result(out: Output, result: dict, text: str) -> None:
    if out.as_json:
        out.json(result)
    else:
        out.line(text)


HANDLERS = {"status": _status, "workers": _workers, "queues": _queues, "jobs": _jobs, "models": _models,
            "train": _train, "embed": _embed, "forget": _forget}
