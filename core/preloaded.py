"""Run `python run.py ...` or `python -m pytest ...` in a fork of a process that has already imported
torch and the other heavy libraries: the same program, about 4 s less start-up each time.

The planted-bug hunts (core/planted_bugs.py) start two short processes per bug, a toy run and a
pytest run, in a scratch copy of the repository. A fresh interpreter spends ~4 s of CPU importing
torch (and torch._dynamo, which the first optimizer step imports), matplotlib, gymnasium and pytest
before the first line of the program; over the ~110 processes of the suite's hunts that is most of
a worker's time. A *zygote* imports those libraries once and forks a child per command.

Only third-party libraries are preloaded, never this project's code: the child puts the scratch copy
first on sys.path and imports `core`, the modules and the tests from there, exactly as a fresh
`PYTHONPATH=<copy> python run.py` would. The zygote never runs a torch op, so no thread pool exists
when it forks (forking after one is unsafe). A child that outlives its timeout is killed.
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ZYGOTE = r'''
import json, os, signal, sys, time
import matplotlib
matplotlib.use("Agg")
import numpy, torch, torch._dynamo, matplotlib.pyplot, gymnasium, pandas, rich, jinja2, pytest, runpy

def child(request):
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the requests pipe is the zygote's alone
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[:] = [request["cwd"]] + [p for p in sys.path if p not in ("", request["cwd"])]
    sys.argv = list(request["argv"])
    code = 0
    try:
        if request["kind"] == "pytest":
            code = int(pytest.main(sys.argv[1:]))
        else:
            # absolute: a spawned process (core/distributed.run_on_ranks) re-imports __main__ by this path,
            # from the zygote's original directory, not this cwd
            runpy.run_path(os.path.abspath(sys.argv[0]), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(request)
    deadline, status = time.monotonic() + request["timeout"], None
    while True:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(raw)
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.02)
    print(json.dumps({"status": status}), flush=True)
'''

_local = threading.local()
_zygotes: list[subprocess.Popen] = []


def _zygote() -> subprocess.Popen:
    """This thread's zygote (hunts run side by side in threads; each gets its own)."""
    proc = getattr(_local, "zygote", None)
    if proc is None or proc.poll() is not None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["OMP_NUM_THREADS"] = "1"  # read once, when torch is imported
        proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                cwd=tempfile.gettempdir(), env=env, text=True)
        _local.zygote = proc
        _zygotes.append(proc)
    return proc


@atexit.register
def _stop_zygotes() -> None:
    for proc in _zygotes:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=10)


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """Run `python *argv` (argv[0] a script, or "-m", "pytest", ...) in `cwd` with `env`, forked from
    the zygote. Returns (exit status, or None when it timed out; everything it printed)."""
    kind = "pytest" if argv[:2] == ["-m", "pytest"] else "script"
    if argv[0].startswith("-") and kind != "pytest":
        raise ValueError(f"preloaded.run runs a script or -m pytest, not {argv[:2]}")
    args = ["pytest", *argv[2:]] if kind == "pytest" else list(argv)
    with tempfile.NamedTemporaryFile("r", suffix=".log", encoding="utf-8", errors="replace") as log:
        zygote = _zygote()
        request = {"kind": kind, "argv": args, "cwd": str(cwd), "env": env, "log": log.name, "timeout": timeout}
        zygote.stdin.write(json.dumps(request) + "\n")
        zygote.stdin.flush()
        reply = zygote.stdout.readline()
        if not reply:
            raise RuntimeError("the preloaded launcher died (core/preloaded.py)")
        return json.loads(reply)["status"], log.read()
