"""
How a script dies: a user's mistake (a bad flag, path, data file or checkpoint) is one line, not a traceback.

    from lib.errors import install
    install()  # in a script, right after its imports

The split follows where the exception was raised: the project's own checks raise ValueError, FileNotFoundError
or TypeError with a message that names the value and the fix (STYLE.md section 6), so their traceback adds nothing.
An error from inside torch, numpy or Python itself, or any other exception, is a bug to report: its traceback stays.
"""

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
USER_ERRORS = (ValueError, FileNotFoundError, TypeError, PermissionError, ImportError)


def _raised_here(tb) -> bool:
    """True when the innermost frame of a traceback is in one of this project's files (not a virtualenv's)."""
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    rel = os.path.relpath(path, ROOT).split(os.sep)
    # '<string>' (python -c) and '<frozen ...>' frames are no file of ours
    return (os.path.isfile(path) and rel[0] != ".."
            and not any(p in (".venv", "venv", "site-packages", "dist-packages") for p in rel))


def _exit(line: str, code: int):
    """Print line (rank 0 only under torchrun) and exit with code at once: an excepthook cannot sys.exit."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _hook(kind, exc, tb):
    if os.environ.get("LLM_E2E_TRACEBACK") == "1":
        return sys.__excepthook__(kind, exc, tb)
    if issubclass(kind, KeyboardInterrupt):
        _exit("interrupted", 130)  # 128 + SIGINT, as shells report it
    if issubclass(kind, USER_ERRORS) and _raised_here(tb):
        _exit(f"error: {exc}" if str(exc) else f"error: {kind.__name__}", 2)  # chained causes are not printed
    sys.__excepthook__(kind, exc, tb)


def install():
    """Ctrl-C prints `interrupted` and exits 130; a USER_ERRORS exception raised in this project's own files prints
    `error: <message>` (rank 0 only) and exits 2; anything else keeps Python's traceback and exit status 1.
    LLM_E2E_TRACEBACK=1 shows every traceback. Ctrl-C raises KeyboardInterrupt also where SIGINT started ignored
    (a non-interactive runner's child); the trainers then install their own stop handler."""
    sys.excepthook = _hook
    signal.signal(signal.SIGINT, signal.default_int_handler)

