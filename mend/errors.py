"""Exception and warning types of mend.

Every error a user can trigger with bad input is one of these, and its message names the
problem and the fix. They subclass the built-in type a caller would naturally catch
(``ValueError`` for bad values, ``RuntimeError`` for an environment that cannot do what was
asked), so ``except ValueError`` keeps working.
"""


class MendError(Exception):
    """Base class of every error raised by mend."""


class ConfigError(MendError, ValueError):
    """A config key does not exist, or a value has the wrong type or range."""


class InputError(MendError, ValueError):
    """Demonstrations, queries or options that mend cannot use (empty, wrong type, too long)."""


class BackboneError(MendError, RuntimeError):
    """A model cannot be loaded as asked (a missing package, 8-bit where bitsandbytes cannot
    run it, a bad path)."""


class CheckpointError(MendError, ValueError):
    """A checkpoint directory is missing files or does not fit the models it is loaded with."""


class TrainingError(MendError, RuntimeError):
    """Training cannot go on (a non-finite loss, an optimizer that cannot run here)."""


class TruncationWarning(UserWarning):
    """Input was cut to fit a length budget; the message counts what was dropped."""
