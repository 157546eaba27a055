#!/usr/bin/env python
"""Finetune command line: list modules, show one, run one.

    python run.py --list
    python run.py --info mdp
    python run.py --module mdp --help          # config fields and presets; runs nothing
    python run.py --module mdp --toy
    python run.py --module td_learning --set episodes=300 --set alpha=0.3
    python run.py --module gae --preset default --seed 3
    python run.py --chat [--model grpo] [--prompt TEXT]    # talk to a model your runs trained
    python run.py --serve [--model grpo] [--port 8000]     # the same model behind an OpenAI-compatible API

Exit status (core/cli.py): 0 every check passed, 1 a check failed, 2 bad input (unknown module,
key or value out of its range, unreadable file, unwritable work dir), 3 an internal error (a bug: the
traceback is in <module>/output/<preset>.crashed/traceback.log), 130 interrupted (the previous run's
folder is intact; a resumable module keeps its checkpoint: rerun with --set resume=true).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from datetime import datetime, timezone

import torch
from rich.markup import escape
from rich.table import Table

from core import cli
from core.config import ConfigError, field_docs, field_types, type_name
from core.distributed import is_main_process
from core.errors import UserError
from core.registry import Module, Registry, UnknownModule, discover
from core.run_context import RunResult, crashed_folder, execute, read_run_index
from learning.questions import load_bank

# piped output (CI logs, tests) gets wide tables instead of rich's 80-column default
console = cli.Console()
err = cli.Console(stderr=True)


MAX_THREADS = 1024


def thread_count(raw: str) -> int:
    if not re.fullmatch(r"[0-9]+", raw) or not 1 <= int(raw) <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads in [1, {MAX_THREADS}], got {raw!r}")
    return int(raw)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = cli.Parser(description="Finetune: run and inspect learning modules.", add_help=False)
    p.add_argument("-h", "--help", action="store_true", help="this help; with --module, the module's config")
    p.add_argument("--list", action="store_true", help="table of modules with their last runs")
    p.add_argument("--info", metavar="NAME", help="what a module shows, its metrics, checks and presets")
    p.add_argument("--progress", action="store_true",
                   help="your day on the 14-day roadmap and the level checkpoints (options: scripts/progress.py)")
    p.add_argument("--module", metavar="NAME", help="the module to run")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--toy", action="store_true", help="shortcut for --preset toy (seconds on a CPU)")
    group.add_argument("--preset", default=None, help="preset to start from (default: 'default')")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field (repeatable); see --module NAME --help")
    p.add_argument("--seed", default=None,
                   help="random seed in [0, 2^32-1] (overrides the preset's; with --chat, seeds the sampled replies)")
    p.add_argument("--threads", type=thread_count, default=None,
                   help="torch CPU threads (default: the module's choice, else 1 for --toy and the idle cores "
                        "for other presets)")
    served = p.add_argument_group("chat and serve: the language models your runs trained "
                                  "(post_train/systems/inference)")
    served.add_argument("--chat", action="store_true",
                        help="chat in the terminal, the reply streamed (/reset starts over, /exit or Ctrl-D leaves)")
    served.add_argument("--serve", action="store_true",
                        help="an OpenAI-compatible HTTP server: /v1/models, /v1/chat/completions, /v1/completions")
    served.add_argument("--model", metavar="NAME[:PRESET]",
                        help="which model (sft, grpo, grpo:toy, ...; default: the newest post-trained one)")
    served.add_argument("--prompt", metavar="TEXT", help="with --chat: print the answer to one message and exit")
    served.add_argument("--temperature", metavar="T", type=bounded(float, 0, 2), default=None,
                        help="with --chat: sampling temperature in [0, 2], 0 = greedy (default 0.7)")
    served.add_argument("--max-tokens", metavar="N", type=bounded(int, 1, 1_000_000), default=None,
                        help="with --chat: reply budget in tokens (default 64; the context may leave fewer)")
    served.add_argument("--host", default=None, help="with --serve: address to listen on (default 127.0.0.1)")
    served.add_argument("--port", metavar="N", type=bounded(int, 0, 65535), default=None,
                        help="with --serve: TCP port (default 8000; 0 picks a free one)")
    args = p.parse_args(argv)
    args.parser = p
    return args


def bounded(kind: type, low: float, high: float):
    """An argparse type: a number of `kind` in [low, high], else a one-line usage error."""
    def parse(raw: str):
        try:
            value = kind(raw)
        except ValueError:
            expected = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {raw!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a value in [{low}, {high}], got {raw!r}")
        return value
    return parse


def ago(iso: str) -> str:
    seconds = (datetime.now(timezone.utc) - datetime.fromisoformat(iso)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return "just now"


def last_run_cell(entry: dict | None) -> str:
    if entry is None:
        return "[dim]never[/]"
    colour = "green" if entry["status"] == "passed" else "red"
    return (f"[{colour}]{entry['checks_passed']}/{entry['checks_total']} checks[/] "
            f"{entry['wall_time_s']:.1f}s, {ago(entry['finished_at'])}")


def cmd_list(registry: Registry) -> int:
    index = read_run_index()
    table = Table(title="Finetune modules", show_lines=False)
    for col in ("module", "category", "title", "last toy run", "last default run"):
        table.add_column(col)
    for name, m in registry.modules.items():
        runs = index.get(name, {})
        table.add_row(name, m.category, m.title, last_run_cell(runs.get("toy")), last_run_cell(runs.get("default")))
    console.print(table)
    report_broken(registry)
    console.print("Run one: [bold]python run.py --module NAME --toy[/]   Details: python run.py --info NAME")
    return 0


def report_broken(registry: Registry) -> None:
    for broken in registry.broken:
        err.print(f"[red]broken module manifest[/] {broken.path}: {broken.error}")


def cmd_progress(registry: Registry) -> int:
    from learning import roadmap  # the study layer loads only when asked for
    try:
        report = roadmap.progress_report(registry, None, datetime.now(timezone.utc))
    except roadmap.PROGRESS_ERRORS as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        return 2
    roadmap.print_progress(report, console)
    return 0


def cmd_info(m: Module) -> int:
    console.print(f"[bold]{m.name}[/] — {escape(m.title)}  [dim]({m.category}, {m.rel_path})[/]\n{escape(m.summary)}\n")
    metrics = Table(title="metrics it reports")
    metrics.add_column("metric")
    metrics.add_column("meaning")
    for name, meaning in m.metrics.items():
        metrics.add_row(name, escape(meaning))
    console.print(metrics)
    checks = Table(title="checks a correct run must pass")
    for col in ("check", "presets", "why"):
        checks.add_column(col)
    for c in m.checks:
        checks.add_row(c.describe(), ",".join(c.presets or ["all"]) + (" (conditional)" if c.when else ""),
                       escape(c.why))
    console.print(checks)
    console.print(f"presets: {', '.join(m.presets)}   depends: {', '.join(m.depends) or 'nothing'}   "
                  f"interview questions: {len(load_bank(m))}")
    console.print(f"theory: {m.rel_path / 'README.md'}   brief: python scripts/interview_brief.py --module {m.name}   "
                  f"drill: python scripts/interview_qa.py --module {m.name}")
    runs = read_run_index().get(m.name, {})
    for preset, entry in runs.items():
        console.print(f"last {preset} run: {last_run_cell(entry)} → {entry['out_dir']}")
    return 0


def cmd_module_help(m: Module) -> int:
    cls = m.config_class
    docs, types_ = field_docs(cls), field_types(cls)
    table = Table(title=f"{m.name}: config fields (--set KEY=VALUE)")
    table.add_column("key", no_wrap=True)
    table.add_column("type and valid values", max_width=28)
    for preset in m.presets:
        table.add_column(preset, max_width=16, overflow="fold")
    table.add_column("meaning", ratio=1)
    for f in dataclasses.fields(cls):
        values = [repr(getattr(p, f.name)) for p in m.presets.values()]
        table.add_row(f.name, escape(type_name(types_[f.name])), *map(escape, values), escape(docs.get(f.name, "")))
    console.print(f"[bold]{m.name}[/] — {escape(m.title)}\n{escape(m.summary)}\n")
    console.print(table)
    console.print(f"usage: python run.py --module {m.name} [--toy | --preset {'|'.join(m.presets)}] "
                  f"[--set KEY=VALUE]... [--seed N]\n(the config fields above; a value outside its range is "
                  f"refused before any work, exit 2)")
    return 0


def print_result(result: RunResult) -> None:
    metrics = Table(title=f"{result.module} [{result.preset}] metrics ({result.wall_time_s:.1f}s)")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for k, v in result.metrics.items():
        metrics.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    console.print(metrics)
    checks = Table(title="checks")
    for col in ("", "check", "actual", "target", "why"):
        checks.add_column(col)
    for c in result.checks:
        fmt = lambda x: f"{x:.6g}" if isinstance(x, float) else str(x)  # noqa: E731
        checks.add_row("[green]PASS[/]" if c["passed"] else "[red]FAIL[/]", c["check"],
                       fmt(c["actual"]), fmt(c["target"]), escape(c["why"]))
    console.print(checks)
    if result.timings:
        console.print("timings (vary from run to run; in run.json, not metrics.json): "
                      + ", ".join(f"{k} {v:.4g}" for k, v in result.timings.items()))
    console.print(f"artifacts: {result.out_dir}")


def cmd_run(m: Module, args: argparse.Namespace, state: argparse.Namespace) -> int:
    preset = "toy" if args.toy else (args.preset or "default")
    state.crash_log = crashed_folder(m, preset) / "traceback.log"  # where a bug's traceback goes
    console.print(f"[bold]{m.name}[/] — {m.title}  preset=[cyan]{preset}[/]"
                  + (f"  overrides={args.overrides}" if args.overrides else ""))
    try:
        result = execute(m, preset, args.overrides, args.seed, args.threads, console)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (python run.py --module {m.name} --help lists each field's range)") from None
    print_result(result)
    if result.index_error:
        print(f"warning: the run is complete in {result.out_dir}, but the run index could not be updated "
              f"({result.index_error}): --list and later chained runs will not see it", file=sys.stderr)
    return cli.OK if result.passed else cli.CHECK_FAILED


CHAT_FLAGS, SERVE_FLAGS = ("prompt", "temperature", "max_tokens", "seed"), ("host", "port")
RUN_FLAGS = ("preset", "overrides", "toy")


def cmd_chat_or_serve(args: argparse.Namespace) -> int:
    """--chat / --serve: the model is chosen from the run index (post_train/systems/inference/code/models.py)."""
    from post_train.systems.inference.code.models import choose_model  # loads only when asked for: --list stays fast

    command = "chat" if args.chat else "serve"
    others = {"chat": SERVE_FLAGS, "serve": CHAT_FLAGS}[command]
    misplaced = [flag for flag in (*others, *RUN_FLAGS) if getattr(args, flag) not in (None, False, [])]
    if args.serve and args.chat or args.module or args.list or args.info or args.progress or misplaced:
        own = CHAT_FLAGS if args.chat else SERVE_FLAGS
        raise UserError(f"--{command} runs alone, with its own options: --model, --threads and "
                        f"{', '.join('--' + f.replace('_', '-') for f in own)} (python run.py --help)")
    torch.set_num_threads(args.threads or 1)  # small models decode fastest on one thread; the server needs the other
    servable = choose_model(args.model, say=lambda line: err.print(f"[yellow]{escape(line)}[/]"))
    if args.serve:
        from post_train.systems.inference.code.serve import DEFAULT_HOST, DEFAULT_PORT, serve
        try:
            serve(servable, args.host or DEFAULT_HOST, DEFAULT_PORT if args.port is None else args.port,
                  say=lambda text: print(text, flush=True))  # not rich: the curl line must not wrap
        except KeyboardInterrupt:
            err.print("server stopped")
            return cli.INTERRUPTED
        return cli.OK
    from post_train.systems.inference.code.chat import ChatSettings, answer_once, chat
    settings = ChatSettings(seed=None if args.seed is None else chat_seed(args.seed))
    if args.temperature is not None:
        settings.temperature = args.temperature
    if args.max_tokens is not None:
        settings.max_tokens = args.max_tokens
    if args.prompt is not None:
        return answer_once(servable, args.prompt, settings)
    return chat(servable, settings, err)


def chat_seed(raw: str) -> int:
    if not re.fullmatch(r"[0-9]+", raw) or int(raw) > 2**32 - 1:
        raise UserError(f"--seed: expected a whole number in [0, 2^32-1], got {raw!r}")
    return int(raw)


def main(argv: list[str] | None = None) -> int:
    state = argparse.Namespace(crash_log=cli.crash_log("run")())
    return cli.guard(lambda: _main(sys.argv[1:] if argv is None else argv, state), lambda: state.crash_log,
                     interrupted="interrupted: the previous run's folder is as it was; a module that "
                                 "checkpoints keeps its state (rerun with --set resume=true)")


def _main(argv: list[str], state: argparse.Namespace) -> int:
    args = parse_args(argv)
    console.quiet = not is_main_process()  # under torchrun, rank 0 speaks for all (errors still show)
    if args.help and not args.module:
        args.parser.print_help()
        return 0
    if args.chat or args.serve:
        return cmd_chat_or_serve(args)
    name = args.info or args.module
    if not (name or args.list or args.progress):
        args.parser.print_help()
        raise UserError("say what to do: --list, --info NAME or --module NAME, or --chat / --serve "
                        "(see the help above)")
    registry = discover()
    if args.list:
        return cmd_list(registry)
    if args.progress:
        return cmd_progress(registry)
    try:
        module = registry.get(name)
    except UnknownModule:
        report_broken(registry)
        raise
    if args.info:
        return cmd_info(module)
    if args.help:
        return cmd_module_help(module)
    return cmd_run(module, args, state)


if __name__ == "__main__":
    sys.exit(main())
