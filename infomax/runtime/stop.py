"""Stop requests: signals from the user or the scheduler, and a launcher that died.

Used by pretraining and by the eval stage's resumable fits; the launcher (SLURM via submitit)
imports only :data:`PREEMPT_SIGNAL` from here.
"""

from __future__ import annotations

import os
import signal
from typing import Any

# submitit's preemption / time-limit signal (SLURM sends it `--signal-delay` seconds before the end).
PREEMPT_SIGNAL = signal.SIGUSR2
# Causes the ranks agree on, in rising order: the ranks' highest is every rank's. SIGTERM may be a preemption
# (SLURM's default) or a cancel, which the job tells apart (infomax.launch.jobs); USR2 always asks for the requeue.
SHARED_CAUSES = ("", "SIGTERM", PREEMPT_SIGNAL.name)


class SecondCtrlC(KeyboardInterrupt):
    """A Ctrl-C after the first: the user does not want to wait for the save. (A plain KeyboardInterrupt is a
    Ctrl-C before any StopFlag was installed: while the command was starting.)"""


class StopFlag:
    """Set by SIGTERM, SIGUSR1 or SIGUSR2 (cancel, preemption, time limit, a scheduler's stop) and by
    Ctrl-C (SIGINT; a second Ctrl-C aborts at once, without saving).

    The handler only sets a flag; ranks agree on it at the next step boundary (one all-reduce of
    :meth:`votes`, taken back by :meth:`agreed`), then all save a checkpoint and exit cleanly together.
    """

    def __init__(self) -> None:
        self.signal_name = ""
        self._signalled = False
        # Under `accelerate launch` / torchrun the launcher is our parent. If it dies (kill -9), the
        # ranks are re-parented and would run on unseen, racing any rerun: treat that as a stop.
        launched = "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ
        self._launcher = os.getppid() if launched else None

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGUSR1, PREEMPT_SIGNAL, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    @property
    def requested(self) -> bool:
        if not self._signalled and self._launcher is not None and os.getppid() != self._launcher:
            self._signalled, self.signal_name = True, "launcher exited"
        return self._signalled

    def votes(self) -> tuple[float, float]:
        """This rank's (stop request, shared cause: its place in ``SHARED_CAUSES``) for the ranks' max
        (``agree_max``)."""
        cause = SHARED_CAUSES.index(self.signal_name) if self.signal_name in SHARED_CAUSES else 0
        return float(self.requested), float(cause)

    def agreed(self, stop: float, cause: float) -> bool:
        """The ranks' maxima of :meth:`votes`: whether every rank stops now. A preemption (USR2, else SIGTERM) on
        any rank is every rank's cause, since a rank may learn of the stop from the others before its own signal
        arrives, and each must then hand the job to submitit's requeue (``infomax.launch.jobs``) rather than end it."""
        if cause > 0:
            self._signalled, self.signal_name = True, SHARED_CAUSES[int(cause)]
        return stop > 0

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self._signalled:
            raise SecondCtrlC
        self._signalled = True
        self.signal_name = signal.Signals(signum).name
