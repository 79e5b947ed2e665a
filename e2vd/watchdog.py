"""When the daemon tells systemd it is alive (WATCHDOG=1), and when its inference is stuck.

`Watchdog` only decides, like `e2vd.lifecycle.LifecycleClock`: it reads no clock and does no
I/O; every method takes `now` (seconds on the daemon's monotonic clock) and `running_since`,
when the model call in progress began (None while the worker is idle). The daemon's main loop
asks it at every look (docs/design.md, the lifecycle):

- the worker is healthy while it is idle or its current model call has run for less than
  `inference_timeout` seconds; only then is a ping sent, at most every `interval` seconds (half
  of systemd's WatchdogSec=). A stuck worker therefore stops the pings, and systemd's watchdog
  ends the process even if the daemon could not do it itself;
- once the call has run `inference_timeout` seconds the worker is stuck (`stuck`): the daemon
  leaves through its shutdown path with Reason.STUCK, and the process ends (a Python thread stuck
  in a C call cannot be stopped, and only the process's exit hands the GPU back).
"""
from __future__ import annotations

import math


class Watchdog:
    """The ping decision and the stuck verdict; see the module docstring.

    `inference_timeout`: seconds one model call may run (the setting of that name, > 0).
    `interval`: seconds between WATCHDOG=1 pings, or None when systemd does not watch the daemon
    (`e2vd.systemd.watchdog_interval`): then `ping` is always False, and `stuck` still applies.
    """

    def __init__(self, inference_timeout: float, interval: float | None) -> None:
        if not inference_timeout > 0:
            raise ValueError(f"inference_timeout must be > 0 seconds, got {inference_timeout!r}")
        self.inference_timeout = float(inference_timeout)
        self.interval = None if interval is None else max(0.0, float(interval))
        self._last_ping = -math.inf

    def age(self, now: float, running_since: float | None) -> float | None:
        """Seconds the model call in progress has run at `now`, or None while the worker is idle."""
        return None if running_since is None else max(0.0, now - running_since)

    def stuck(self, now: float, running_since: float | None) -> bool:
        """Whether the model call in progress has run `inference_timeout` seconds or more."""
        age = self.age(now, running_since)
        return age is not None and age >= self.inference_timeout

    def ping(self, now: float, running_since: float | None) -> bool:
        """Whether to send WATCHDOG=1 at `now`: systemd watches, the worker is healthy and
        `interval` seconds have passed since the last ping; a True answer counts as sent."""
        if self.interval is None or self.stuck(now, running_since):
            return False
        if now - self._last_ping < self.interval:
            return False
        self._last_ping = now
        return True

    def next_look(self, now: float, running_since: float | None) -> float | None:
        """The latest time the daemon should look again: the next ping, or the moment the call in
        progress becomes stuck, whichever comes first; None when neither is ahead."""
        times = []
        if running_since is not None:
            times.append(running_since + self.inference_timeout)
        if self.interval is not None and not self.stuck(now, running_since):
            times.append(self._last_ping + self.interval)
        return min(times) if times else None
