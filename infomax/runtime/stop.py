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


class StopFlag:
    """Set by SIGTERM, SIGUSR1 or SIGUSR2 (cancel, preemption, time limit, a scheduler's stop) and by
    Ctrl-C (SIGINT; a second Ctrl-C aborts at once, without saving).

    The handler only sets a flag; ranks agree on it at the next step boundary (one all-reduce),
    then all save a checkpoint and exit cleanly together.
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

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self._signalled:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the save
        self._signalled = True
        self.signal_name = signal.Signals(signum).name
