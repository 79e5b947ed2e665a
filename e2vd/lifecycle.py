"""When the daemon exits: the keep-warm hold, the idle clock and the unavailable grace.

`LifecycleClock` only decides. It reads no clock, never sleeps and does no I/O: every method
takes `now` (seconds on one monotonic clock; `time.monotonic()` in the daemon) from its caller,
so a test walks it through hours in microseconds. The daemon's main loop reports what happens
(`loaded`, `failed`, `busy`, `idle`), connection threads add keep-warm holds (`hold`), and the
loop sleeps until `deadline(now)` and leaves through its one shutdown path once `expired(now)`
names a reason. Safe to call from any thread (one lock, held only inside these methods).
The design is in docs/design.md (the lifecycle). `Reason` names every way the daemon exits,
including those decided elsewhere: a stuck model call (e2vd.watchdog) and settings that cannot
be used under socket activation (e2vd.misconfigured).

The rules, by phase:
- loading: never expires by itself. After `load_timeout` seconds `load_overdue(now)` says so:
  the daemon then gives up on the load, which makes the model unavailable (below). systemd's
  start timeout, extended while the model loads, is only the backstop.
- ready: the daemon exits `idle_timeout` seconds after the latest of: the moment the model was
  ready, the keep-warm deadline, and the end of the last thing that held it awake. The caller
  reports that end with `busy(now, until)`: math.inf while work is in progress (no deadline at
  all then), else when the last hold ends or ended (e.g. a connection's last use +
  connection_timeout). `idle(now)` reports that nothing holds it, with no end known: work whose
  end was not reported counts as ended at `now`.
- unavailable (the model failed to load, or the inference worker died): exits
  `unavailable_grace` seconds after the failure, whatever is in progress, so that socket
  activation can never restart a broken model in a tight loop.
"""
from __future__ import annotations

import enum
import math
import threading
from dataclasses import dataclass

from e2vd.vocabulary import State


class Reason(enum.Enum):
    """Why the daemon exits."""

    IDLE = "idle"                 # idle_timeout passed with nothing to do
    SIGNAL = "signal"             # SIGTERM/SIGINT (systemctl stop)
    UNAVAILABLE = "unavailable"   # the model could not be loaded; unavailable_grace passed
    STUCK = "stuck"               # a model call ran past inference_timeout (e2vd.watchdog): the process ends
    CONFIG_INVALID = "config_invalid"   # socket-activated with unusable settings; unavailable_grace passed
    CONFIG_FIXED = "config_fixed"       # ... and the settings became usable: a fresh daemon takes over


@dataclass(frozen=True)
class Hold:
    """The outcome of one keep-warm request (POST /v1/warmup?hold=S)."""

    asked: float          # seconds asked for
    granted: float        # seconds granted: `asked` capped by max_hold (0: no hold)
    until: float | None   # the keep-warm deadline now in force (this hold or a longer one), or None

    @property
    def capped(self) -> bool:
        """Whether max_hold cut the hold short."""
        return self.granted < self.asked


class LifecycleClock:
    """Decides when the daemon exits; see the module docstring for the rules.

    idle_timeout, max_hold, unavailable_grace and load_timeout are seconds (the settings of the
    same names); `loading_since` is when the load began, on the caller's clock.
    """

    def __init__(self, idle_timeout: float, max_hold: float, unavailable_grace: float,
                 load_timeout: float = math.inf, loading_since: float = 0.0) -> None:
        self.idle_timeout = float(idle_timeout)
        self.max_hold = float(max_hold)
        self.unavailable_grace = float(unavailable_grace)
        self.load_timeout = float(load_timeout)
        self._loading_since = float(loading_since)
        self._lock = threading.Lock()
        self._phase = State.LOADING
        self._ready_at = -math.inf
        self._failed_at = math.inf
        self._keep_until = -math.inf
        self._held_until = -math.inf            # end of the last hold (inf: work in progress)

    # --- what happened ---
    def loaded(self, now: float) -> None:
        """The model is loaded: the idle clock may run from `now` on."""
        with self._lock:
            if self._phase is State.LOADING:
                self._phase, self._ready_at = State.READY, now

    def failed(self, now: float) -> None:
        """The model is unavailable from `now` on: exit unavailable_grace seconds later.
        Only the first failure counts."""
        with self._lock:
            if self._phase is not State.UNAVAILABLE:
                self._phase, self._failed_at = State.UNAVAILABLE, now

    def hold(self, seconds: float, now: float) -> Hold:
        """Keep the daemon warm at least `seconds` from `now`, capped by max_hold. A hold never
        shortens a longer one already in force; 0 (or less) asks for none."""
        asked = max(0.0, float(seconds))
        granted = min(asked, self.max_hold)
        with self._lock:
            if granted > 0:
                self._keep_until = max(self._keep_until, now + granted)
            until = self._keep_until if self._keep_until > now else None
        return Hold(asked, granted, until)

    def busy(self, now: float, until: float = math.inf) -> None:
        """What held the daemon awake, as seen at `now`, ends (or ended) at `until`: math.inf
        while work is in progress; a time before `now` means nothing holds it any more and the
        idle clock runs from then. Replaces the previous report."""
        with self._lock:
            self._held_until = until

    def idle(self, now: float) -> None:
        """Nothing holds the daemon awake at `now`, and the caller knows no end of the last hold:
        work in progress reported before counts as ended at `now`; a reported end stays."""
        with self._lock:
            if self._held_until == math.inf:
                self._held_until = now

    def observe(self, now: float, working: bool, held_until: float | None) -> None:
        """One look at what holds the daemon awake at `now`: model work queued or running
        (`working`: held with no known end), else connections in use until `held_until`
        (`e2vd.server.Server.holding`), else nothing (`idle`)."""
        if working:
            self.busy(now)
        elif held_until is not None:
            self.busy(now, held_until)
        else:
            self.idle(now)

    # --- what follows ---
    @property
    def phase(self) -> State:
        """The model's state as the clock knows it (loading, ready, unavailable)."""
        return self._phase

    def load_overdue(self, now: float) -> bool:
        """Whether the model is still loading at `now`, load_timeout seconds or more after it began."""
        at = self.load_deadline()
        return at is not None and now >= at

    def load_deadline(self) -> float | None:
        """When a load still running is overdue (None once it has ended, or with no load_timeout)."""
        with self._lock:
            at = self._loading_since + self.load_timeout
            return at if self._phase is State.LOADING and math.isfinite(at) else None

    def held(self, now: float) -> bool:
        """Whether the last report says something holds the daemon awake at `now`."""
        with self._lock:
            return self._held_until > now

    def keep_warm_until(self, now: float) -> float | None:
        """The keep-warm deadline while it lies after `now`, else None."""
        with self._lock:
            return self._keep_until if self._keep_until > now else None

    def deadline(self, now: float, *, if_idle_now: bool = False) -> float | None:
        """When the daemon exits if nothing changes after `now`; None while loading, while work is
        in progress, or never (idle_timeout infinite). `if_idle_now`: as if the work in progress
        ended at `now` (what GET /v1/status shows, asked from inside a request)."""
        with self._lock:
            if self._phase is State.LOADING:
                return None
            if self._phase is State.UNAVAILABLE:
                return self._failed_at + self.unavailable_grace
            held = self._held_until
            if held == math.inf:
                if not if_idle_now:
                    return None
                held = now
            end = max(held, self._keep_until, self._ready_at)
        at = end + self.idle_timeout
        return at if math.isfinite(at) else None

    def expired(self, now: float) -> Reason | None:
        """The reason to exit at `now` (Reason.IDLE or Reason.UNAVAILABLE), or None."""
        at = self.deadline(now)
        if at is None or now < at:
            return None
        return Reason.UNAVAILABLE if self._phase is State.UNAVAILABLE else Reason.IDLE
