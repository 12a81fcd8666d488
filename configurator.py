"""
Config files and --key=value overrides, shared by every script:

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

A script keeps its defaults as plain module-level assignments and applies everything in one line:

    config = configure(globals(), sys.argv[1:]); globals().update(config)

Order: defaults, then config files (plain Python, executed in order), then --key=value; the last one wins.
"""

import ast
import difflib
import os
from typing import Optional

SIMPLE = (bool, int, float, str, tuple, list, type(None))


def _check_type(key: str, value, default, source: str):
    """Return value if it fits the default's type (an int is accepted for a float); else raise TypeError."""
    if default is None:  # a None default accepts any type
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise TypeError(f"{source}: {key} expects a {type(default).__name__} (default {default!r}), got "
                        f"{value!r} ({type(value).__name__}); e.g. --{key}={default!r}")
    return value


def _unknown(key: str, known, source: str) -> ValueError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(sorted(known))}"
    return ValueError(f"{source}: unknown config key {key!r}{hint}")


def configure(defaults: dict, argv: list, verbose: Optional[bool] = None, explicit: Optional[set] = None) -> dict:
    """Resolve a script's config -> {key: value}. defaults: the script's globals() (public values of simple type).
    argv: config file paths and --key=value strings. Prints each override with its source on rank 0 unless
    verbose=False. explicit: a set that receives the keys that config files or --key=value set."""
    explicit = set() if explicit is None else explicit
    if verbose is None:
        verbose = int(os.environ.get("RANK", "0")) == 0  # torchrun's rank: print once per job
    # config keys: public lower-case names of simple type (UPPER_CASE names are constants, not settings)
    config = {k: v for k, v in defaults.items() if not k.startswith("_") and not k.isupper() and isinstance(v, SIMPLE)}
    for arg in argv:
        if not arg.startswith("--"):
            # a config file: plain Python assignments, run with the current config visible
            if not os.path.isfile(arg):
                raise FileNotFoundError(f"config file {arg!r} does not exist (arguments are config files or "
                                        f"--key=value)")
            namespace = dict(config)
            with open(arg) as f:
                code = compile(f.read(), arg, "exec")
            exec(code, namespace)
            for key, value in namespace.items():
                if key.startswith("_") or key.isupper() or not isinstance(value, SIMPLE):
                    continue
                if key not in config:
                    raise _unknown(key, config, f"config file {arg}")
                if value is not config[key] and value != config[key]:
                    config[key] = _check_type(key, value, defaults[key], f"config file {arg}")
                    explicit.add(key)
                    if verbose:
                        print(f"config {arg}: {key} = {config[key]!r}")
        else:
            if "=" not in arg:
                raise ValueError(f"argument {arg!r} must look like --key=value")
            key, raw = arg[2:].split("=", 1)  # split on the first '=' only: --start="a=b" keeps "a=b"
            if key not in config:
                raise _unknown(key, config, "command line")
            try:
                value = ast.literal_eval(raw)
            except (SyntaxError, ValueError):
                value = raw  # not a Python literal: a plain string such as --device=cpu
            if isinstance(defaults[key], str) and not isinstance(value, str):
                value = raw  # --out_dir=123 means the string '123'
            config[key] = _check_type(key, value, defaults[key], "command line")
            explicit.add(key)
            if verbose:
                print(f"override: {key} = {config[key]!r}")
    return config
