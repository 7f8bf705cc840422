"""The few error types of jointopt; cli.py maps each to one exit code, in one place."""


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
