"""
Progress of a long pass (a download, data preparation, an evaluation): a tqdm bar on a terminal, a line per tenth
of the total in a log file. Training prints its own lines instead.
"""

import os
import sys
import time
from typing import Optional


def progress(iterable, desc: str = "", total: Optional[int] = None, unit: str = "it", disable: bool = False,
             **kwargs):
    """Iterate with a progress display on rank 0: a tqdm bar when stderr is a terminal, else (a log file, a
    pipe) one line at every tenth of the total, so logs do not fill with redrawn bars."""
    disable = disable or int(os.environ.get("RANK", "0")) != 0
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if sys.stderr.isatty() or disable:
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, **kwargs)
    return _progress_lines(iterable, desc, total, unit)


def _progress_lines(iterable, desc: str, total: Optional[int], unit: str):
    t0, next_mark, n = time.time(), 1, 0
    for n, item in enumerate(iterable, 1):
        yield item
        if total and n * 10 >= next_mark * total:
            while n * 10 >= next_mark * total:
                next_mark += 1
            rate = n / max(time.time() - t0, 1e-9)
            print(f"{desc}: {n:,}/{total:,} {unit} ({100 * n / total:.0f}%, {rate:,.1f} {unit}/s)", file=sys.stderr,
                  flush=True)
    if not total and n:
        print(f"{desc}: {n:,} {unit} in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
