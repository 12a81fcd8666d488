"""
run_script: the project's scripts as real processes, forked from one runner process that has imported torch, numpy
and the project once. Each run is `python SCRIPT ARGS...` in its own process (its own environment, working folder,
exit status, stdout and stderr, lib/errors.py's excepthook), without the interpreter and torch start-up, which
cost seconds on a loaded 2-core machine: a fork costs milliseconds. The runner has one thread (torch's too), so
forking it is safe.
"""

import atexit
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one pytest worker per core: one torch thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# What a runner imports once, before any fork (tests/test_system.py's signal runner starts with it too)
PRELOAD = textwrap.dedent('''
    import torch, numpy, model, configurator, lib.models, lib.lifecycle, lib.tokens, lib.records
    import torch._dynamo  # torch.optim imports it on the first optimizer: seconds, once
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot
    torch.set_num_threads(1)
''')
# Reads one JSON job per line: {"argv", "env", "cwd", "out", "err"}; forks a child that runs argv as `python argv`
# would (a script file, or -c CODE), and answers {"pid"} at once and {"code"} when the child has ended.
RUNNER = PRELOAD + textwrap.dedent('''
    import json, os, runpy, sys
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.chdir(job["cwd"])
            os.environ.clear()
            os.environ.update(job["env"])
            fd = os.open(os.devnull, os.O_RDONLY)
            os.dup2(fd, 0)
            for target, path in ((1, job["out"]), (2, job["err"])):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, target)
            import random
            random.seed()  # a fresh process's unseeded state
            numpy.random.seed()
            sys.argv = list(job["argv"])
            code = 0
            try:
                if sys.argv[0] == "-c":
                    sys.argv = ["-c", *sys.argv[2:]]
                    exec(compile(job["argv"][1], "<string>", "exec"), {"__name__": "__main__"})
                else:
                    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python SCRIPT` sets it
                    runpy.run_path(sys.argv[0], run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else (print(e.code, file=sys.stderr)
                                                                                        or 1)
            except BaseException as e:  # uncaught: what the interpreter does with it (the script's excepthook)
                sys.excepthook(type(e), e, e.__traceback__)
                code = 1
            try:
                import atexit
                atexit._run_exitfuncs()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        status = os.waitpid(pid, 0)[1]
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"code": code}), flush=True)
''')

_runner, _answers = None, queue.Queue()  # the runner process and its answers, read by a thread


def _stop_runner():
    if _runner is not None and _runner.poll() is None:
        _runner.stdin.close()
        _runner.wait(timeout=60)


def pytest_collection_modifyitems(items):
    """The tiny journey's file first: it is the longest (minutes), so under `make test`'s one worker per core
    (pytest-xdist, a file per worker) the other files run beside it instead of after it."""
    items.sort(key=lambda item: os.path.basename(str(item.fspath)) != "test_journey.py")  # stable: else as collected


def run_script(argv: list, env: dict = None, cwd: str = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout),
    in a forked process: argv is a script and its arguments, or ['-c', CODE, ...]."""
    global _runner
    if _runner is None or _runner.poll() is not None:
        _runner = subprocess.Popen([sys.executable, "-c", RUNNER], cwd=ROOT, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        threading.Thread(target=lambda: [_answers.put(json.loads(a)) for a in _runner.stdout], daemon=True).start()
        atexit.register(_stop_runner)
    with tempfile.TemporaryDirectory() as d:
        out, err = os.path.join(d, "out"), os.path.join(d, "err")
        job = {"argv": [str(a) for a in argv], "env": dict(os.environ if env is None else env), "cwd": str(cwd),
               "out": out, "err": err}
        _runner.stdin.write(json.dumps(job) + "\n")
        _runner.stdin.flush()
        pid = _answers.get(timeout=300)["pid"]  # the first job waits for the runner's imports
        try:
            code = _answers.get(timeout=timeout)["code"]
        except queue.Empty:
            os.kill(pid, signal.SIGKILL)
            _answers.get(timeout=60)
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout) from None
        with open(out, errors="replace") as f_out, open(err, errors="replace") as f_err:
            return subprocess.CompletedProcess([sys.executable, *argv], code, f_out.read(), f_err.read())
