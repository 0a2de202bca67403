"""One base class for what the user can fix.

Every check of user input (flags, DeepSpeed JSON, data dirs, checkpoints, exports) raises a
subclass of ``UsageError`` whose message names the problem and the fix. Entry points catch
``UsageError`` alone, print its one line and exit 2, so a bug in our code still shows its
traceback instead of being reported as bad input.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2
# A stop on request (signal, lost launcher) that saved a complete checkpoint: rerun the same
# command (--resume auto) to continue. 75 is EX_TEMPFAIL; the Slurm scripts requeue on it.
EXIT_REQUEUE = 75
# A rank that stopped making progress (or could not carry out a stop) and dumped its stacks:
# nothing new was saved; a rerun continues from the last complete checkpoint.
EXIT_HUNG = 76


class UsageError(ValueError):
    """Bad input; the message names the problem and the fix. (A ValueError for callers that
    catch that.)"""


class ConfigError(UsageError):
    """A bad flag or DeepSpeed config, or a bad combination of them."""


class DataError(UsageError):
    """Bad raw text input, prepared data dir or --data spec."""


class CheckpointError(UsageError):
    """A checkpoint, run dir or export that cannot be used."""
