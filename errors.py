"""The project's own error types, and how the scripts report them.

An error raised through one of these classes is a problem with what the user gave (a config
key, a data file, a checkpoint, a run folder) or a run that cannot go on (a non-finite loss):
the scripts print it as one line naming the key or file and exit with status 2. Anything else
(a shape bug in a new loss, a library failure) is not caught here and keeps its traceback.

The classes also derive from the builtin a caller would expect (``ValueError`` for bad values,
``RuntimeError`` for a run that stops), so ``except ValueError`` keeps working.
"""
from __future__ import annotations

import pickle
import re
import sys


class ProjectError(Exception):
    """Base of every error the scripts report as one line."""


class ConfigError(ProjectError, ValueError):
    """A bad config key or value; the message names the key and what is allowed."""


class DataError(ProjectError, ValueError):
    """Bad data: a missing split or column, an unreadable image, a label out of range..."""


class CheckpointError(ProjectError, ValueError):
    """A checkpoint file that cannot be used; the message names the file."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The file's pickle references a global outside the allow-list; nothing was executed."""


class CheckpointMismatchError(CheckpointError, RuntimeError):
    """A state_dict does not fit the model exactly (missing/unexpected keys, other shapes)."""


class RunFolderError(ProjectError, RuntimeError):
    """The output folder holds a run that cannot be continued with this config."""


class DiskFullError(ProjectError, OSError):
    """A write ran out of disk space or quota; the message names the file. Nothing
    half-written is left under the file's name."""


class NonFiniteLossError(ProjectError, RuntimeError):
    """A loss term became NaN or infinite; the last saved state is intact."""


_WORKER_HEADER = re.compile(r"Caught (\w+) in DataLoader worker process (\d+)\.")


def one_line(e: BaseException) -> str:
    """The message of ``e``; for an error torch re-raised from a data-loader worker (whose
    message is "Caught X in DataLoader worker process N." and the worker's whole traceback),
    only the worker's own message, e.g. "image not found: <file> (in data-loader worker 0)"."""
    text = str(e)
    header, _, traceback_text = text.partition("\n")
    worker = _WORKER_HEADER.fullmatch(header)
    if worker is None:
        return text
    lines = traceback_text.splitlines()
    # The traceback ends with "<module.>Name: message" (the last exception of a chain).
    last = re.compile(rf"(?:[\w.]+\.)?{re.escape(worker.group(1))}: ")
    for i in range(len(lines) - 1, -1, -1):
        found = last.match(lines[i])
        if found:
            message = " ".join([lines[i][found.end():], *lines[i + 1:]]).strip()
            return f"{message} (in data-loader worker {worker.group(2)})"
    return text


def run_main(main, *args) -> int:
    """Run a script's ``main(*args)`` and return its exit status: the project's errors and
    missing or unreadable files (OSError) print one line ``error: ...`` (``one_line``: also
    when a data-loader worker raised them) and give 2; everything else propagates with its
    traceback. ``sys.exit(run_main(main, cfg))``."""
    try:
        status = main(*args)
    except (ProjectError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    return status if isinstance(status, int) else 0
