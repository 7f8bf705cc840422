"""The few error types of jointopt, each with its exit code; the CLI's entry point (`cli.main`) prints
the message on one line and exits with that code, in one place.

    >>> [error.exit_code for error in (InputError, StepError, GateError)]
    [2, 1, 3]
    >>> raise InputError("data.source: no such data file")
    Traceback (most recent call last):
    jointcli.errors.InputError: data.source: no such data file
"""


class JointoptError(Exception):
    """Base class: a message meant for the user, on one line."""

    exit_code = 1


class InputError(JointoptError):
    """Bad input: recipe, data, flags or run directory. Exit code 2."""

    exit_code = 2


class StepError(JointoptError):
    """A step started on valid input and failed. Exit code 1."""

    exit_code = 1


class GateError(JointoptError):
    """A `compare --require/--min-score` gate failed (for CI scripts). Exit code 3."""

    exit_code = 3
