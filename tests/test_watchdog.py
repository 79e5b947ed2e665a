"""e2vd.watchdog.Watchdog with the time passed in: the WATCHDOG=1 ping decision and the stuck verdict."""
from __future__ import annotations

import pytest

from e2vd.watchdog import Watchdog

T0 = 1000.0          # an arbitrary monotonic time
TIMEOUT = 120.0      # inference_timeout
EVERY = 15.0         # ping interval: half of WatchdogSec=30


def pings(dog: Watchdog, times: list[float], running_since: float | None = None) -> list[float]:
    """The times among `times` (in order) at which the watchdog says to ping."""
    return [t for t in times if dog.ping(t, running_since)]


def test_an_idle_worker_is_healthy_and_pinged_every_interval():
    dog = Watchdog(TIMEOUT, EVERY)
    ticks = [T0 + 0.5 * i for i in range(121)]            # the main loop looks every 0.5 s for 60 s
    assert pings(dog, ticks) == [T0, T0 + 15, T0 + 30, T0 + 45, T0 + 60]
    assert not dog.stuck(T0 + 1e6, None) and dog.age(T0, None) is None


def test_pings_go_on_while_a_call_is_younger_than_inference_timeout_and_stop_at_it():
    dog = Watchdog(TIMEOUT, EVERY)
    start = T0 + 7.0                                        # a model call begins
    ticks = [T0 + i for i in range(0, 200)]
    sent = pings(dog, ticks, running_since=start)
    assert sent == [T0 + 15 * k for k in range(9)]          # ... T0+120: the call is 113 s old
    assert max(sent) < start + TIMEOUT
    assert not dog.stuck(start + TIMEOUT - 1e-6, start)
    assert dog.stuck(start + TIMEOUT, start) and dog.age(start + TIMEOUT, start) == TIMEOUT
    assert not dog.ping(start + TIMEOUT + 1000, start)     # never again while it runs


def test_a_call_that_ends_in_time_leaves_the_worker_healthy():
    dog = Watchdog(TIMEOUT, EVERY)
    assert dog.ping(T0, T0)
    assert not dog.ping(T0 + 14.9, T0 + 1)                  # not due yet
    assert dog.ping(T0 + 15, None)                          # the call ended: idle again
    assert dog.ping(T0 + 500, T0 + 400)                     # a later call, 100 s old: healthy


def test_the_next_look_is_the_next_ping_or_the_moment_a_call_turns_stuck():
    dog = Watchdog(TIMEOUT, EVERY)
    assert dog.next_look(T0, None) < T0                               # never pinged: look now
    dog.ping(T0, None)
    assert dog.next_look(T0, None) == T0 + EVERY
    assert dog.next_look(T0 + 1, T0 + 1 - TIMEOUT + 3) == T0 + 4     # stuck in 3 s, before the next ping
    assert dog.next_look(T0 + 1, None) == T0 + EVERY
    stuck_since = T0 - TIMEOUT
    assert dog.next_look(T0, stuck_since) == T0                       # already stuck: no ping ahead


def test_outside_systemd_there_is_no_ping_but_the_bound_still_holds():
    dog = Watchdog(1.0, None)
    assert pings(dog, [T0 + i for i in range(10)]) == []
    assert dog.next_look(T0, None) is None and dog.next_look(T0, T0) == T0 + 1.0
    assert not dog.stuck(T0 + 0.999, T0) and dog.stuck(T0 + 1.0, T0)


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan")])
def test_inference_timeout_must_be_positive(timeout):
    with pytest.raises(ValueError, match="inference_timeout must be > 0"):
        Watchdog(timeout, EVERY)
