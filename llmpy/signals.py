"""Ctrl-C (SIGINT) and SIGTERM as normal events: one line on stderr and exit status 128 + the signal's number
(130, 143), never a traceback. Pure Python.

Three uses:
- Programs with nothing to save (the NumPy trainer, the PyTorch reference, the data scripts, the eval tool) run
  their main under `exit_quietly(prog)`, most through run_quietly, which also ends the errors a user can fix with one
  line: the first signal raises Interrupted where the program is, so `finally` blocks and `except BaseException`
  clean-ups still run (a half-written file is removed), then one line and the exit.
- The mainline's training loop uses StopRequest: the first signal only sets a flag, which the loop reads at the end
  of a step to write a checkpoint and stop cleanly; a second signal gives up at once, with one line.
- Under exit_quietly, a main thread that waits inside threading code (a Future's result) does so under
  DeferredInterrupts: an exception raised by a signal handler in there can leave one of its locks held (raised
  between a lock's acquire and the `with` block that releases it), and the executor's shutdown then waits for that
  lock forever. Deferred, the Interrupted is raised at a point of our code.

Only the main thread receives signals (Python runs handlers there), and worker processes should run
ignore_interrupts first, so that only the parent reports a signal.
"""

import contextlib
import os
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum):
    """The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


def signal_name(signum):
    return signal.Signals(signum).name


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by the first SIGINT or SIGTERM under exit_quietly. A KeyboardInterrupt, so code
    that already cleans up on Ctrl-C does the same on SIGTERM."""

    def __init__(self, signum):
        super().__init__(signal_name(signum))
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def exit_quietly(prog):
    """Runs the block with SIGINT and SIGTERM raising Interrupted; if one arrives, prints `prog: interrupted by
    SIGINT` on stderr and exits with 130 (143 for SIGTERM)."""
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in SIGNALS}
    try:
        yield
    except KeyboardInterrupt as e:  # a plain KeyboardInterrupt too, e.g. raised before the handler was in place
        _ignore_signals()
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"{prog}: interrupted by {signal_name(signum)}", file=sys.stderr, flush=True)
        sys.exit(exit_status(signum))
    except SystemExit:  # the program is ending: a signal now must not print a traceback either
        _ignore_signals()
        raise
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def run_quietly(main, errors):
    """Runs main() as the program: an exception of the classes errors ends it with `prog: error: <the exception>` on
    stderr and status 1, a signal as exit_quietly says; prog is the script's file name."""
    prog = os.path.basename(sys.argv[0])
    with exit_quietly(prog):
        try:
            main()
        except errors as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(1)


def _ignore_signals():
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def ignore_interrupts():
    """For a worker process, first thing. Ctrl-C reaches the whole process group, and only the parent should react
    to it (it ends its workers). A forked worker inherits the parent's handlers (exit_quietly's, which would print
    the worker's own line or traceback): SIGTERM's default ends it silently."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class DeferredInterrupts:
    """Within the block the first SIGINT or SIGTERM is only noted; check() raises it as Interrupted (once), and so
    does leaving the block normally. Use as a context manager; outside it the previous handlers are back."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        self._previous = {signum: signal.signal(signum, self._note) for signum in SIGNALS}
        return self

    def __exit__(self, exc_type, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if exc_type is None:
            self.check()
        return False

    def _note(self, signum, frame):
        if self.signum is None:
            self.signum = signum

    def check(self):
        signum, self.signum = self.signum, None
        if signum is not None:
            raise Interrupted(signum)


class StopRequest:
    """A flag set by the first SIGINT or SIGTERM, for a loop that stops at a safe point (the mainline writes a
    checkpoint at the end of the step). A second signal calls on_second(signum), which should print one line, and
    then ends the process at once with 128 + signum: os._exit, so no clean-up runs and nothing waits (a checkpoint
    being written stays unfinished: its DONE marker is never written, so it is never resumed from).

    Use as a context manager; outside it the previous handlers are back.
    """

    def __init__(self, on_second):
        self.signum = None  # the first signal received, None while none has arrived
        self._on_second = on_second
        self._previous = {}

    def __enter__(self):
        self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            return
        try:
            self._on_second(signum)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_status(signum))

    @property
    def requested(self):
        return self.signum is not None
