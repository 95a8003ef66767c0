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


def run_main(main, *args) -> int:
    """Run a script's ``main(*args)`` and return its exit status: the project's errors and
    missing or unreadable files (OSError) print one line ``error: ...`` and give 2;
    everything else propagates with its traceback. ``sys.exit(run_main(main, cfg))``."""
    try:
        status = main(*args)
    except (ProjectError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return status if isinstance(status, int) else 0
