"""Turning exceptions into the one-line messages users see (`error: ...`, exit status 1)."""


def short_reason(err: BaseException, limit: int = 200) -> str:
    """A one-line description of an exception for user-facing messages."""
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# Exit statuses a cluster manager can act on (README "Runs"): `cli.run_cli` maps exceptions to them.
EXIT_OK = 0
EXIT_BAD_INPUT = 2      # bad flags or data: fix the command
EXIT_TRANSIENT = 75     # a fault worth retrying as it is (disk full, a lost worker, an interrupted write)
EXIT_INTERRUPTED = 130  # the user interrupted (Ctrl-C)


class TransientError(OSError):
    """A fault outside the command's control that a retry (usually with --resume) may get past."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; its message says after which epoch and the command that continues."""
