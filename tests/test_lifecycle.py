"""e2vd.lifecycle.LifecycleClock in-process, with the time passed in: no sleeping, no threads."""
from __future__ import annotations

import math

import pytest

from e2vd.lifecycle import Hold, LifecycleClock, Reason
from e2vd.vocabulary import State

IDLE, MAX_HOLD, GRACE = 300.0, 3600.0, 60.0
T0 = 1000.0   # an arbitrary monotonic time


def ready_clock(at: float = T0) -> LifecycleClock:
    clock = LifecycleClock(IDLE, MAX_HOLD, GRACE)
    clock.loaded(at)
    clock.idle(at)
    return clock


def exits_at(clock: LifecycleClock, at: float) -> None:
    """The clock's deadline is `at`, it has not expired just before and has at `at`."""
    assert clock.deadline(at - 1e-6) == pytest.approx(at)
    assert clock.expired(at - 1e-6) is None
    assert clock.expired(at) is Reason.IDLE


def test_loading_never_expires():
    clock = LifecycleClock(IDLE, MAX_HOLD, GRACE)
    clock.idle(T0)
    assert clock.phase is State.LOADING
    assert clock.deadline(T0 + 1e6) is None and clock.expired(T0 + 1e6) is None


def test_a_load_is_overdue_after_load_timeout_and_only_while_it_runs():
    clock = LifecycleClock(IDLE, MAX_HOLD, GRACE, load_timeout=100.0, loading_since=T0)
    assert clock.load_deadline() == T0 + 100.0
    assert not clock.load_overdue(T0 + 100.0 - 1e-6) and clock.load_overdue(T0 + 100.0)
    assert clock.expired(T0 + 1e6) is None                    # overdue is the daemon's cue, not an exit
    clock.failed(T0 + 100.0)                                  # the daemon gave up on it: the grace runs
    assert not clock.load_overdue(T0 + 1e6) and clock.load_deadline() is None
    assert clock.expired(T0 + 100.0 + GRACE) is Reason.UNAVAILABLE
    loaded = LifecycleClock(IDLE, MAX_HOLD, GRACE, load_timeout=100.0, loading_since=T0)
    loaded.loaded(T0 + 99.0)
    assert not loaded.load_overdue(T0 + 1e6) and loaded.load_deadline() is None
    assert LifecycleClock(IDLE, MAX_HOLD, GRACE).load_deadline() is None   # no load_timeout: never overdue


def test_idle_exit_counts_from_the_moment_the_model_is_ready():
    clock = LifecycleClock(IDLE, MAX_HOLD, GRACE)
    clock.idle(T0)                     # idle while loading: does not count
    clock.loaded(T0 + 50)
    exits_at(clock, T0 + 50 + IDLE)


def test_work_in_progress_pauses_the_idle_clock_and_it_restarts_when_the_work_ends():
    clock = ready_clock()
    clock.busy(T0 + 10)                # a request arrives; no known end
    assert clock.held(T0 + 1e6) and clock.deadline(T0 + 1e6) is None and clock.expired(T0 + 1e6) is None
    clock.idle(T0 + 2000)              # it ends long after idle_timeout
    exits_at(clock, T0 + 2000 + IDLE)
    clock.idle(T0 + 2100)              # saying so again does not restart the clock
    exits_at(clock, T0 + 2000 + IDLE)


def test_a_connection_hold_with_an_end_defers_the_exit_exactly_and_lapses_by_itself():
    clock = ready_clock()
    clock.busy(T0 + 5, until=T0 + 35)  # used at T0+5, connection_timeout 30
    assert clock.held(T0 + 34) and not clock.held(T0 + 35)
    exits_at(clock, T0 + 35 + IDLE)
    clock.idle(T0 + 100)               # nothing holds it now: the reported end stays
    exits_at(clock, T0 + 35 + IDLE)


def test_a_hold_that_ended_early_counts_only_until_then():
    clock = ready_clock()
    clock.busy(T0 + 5, until=T0 + 35)
    clock.busy(T0 + 12, until=T0 + 10)  # seen at T0+12: the connection had closed at T0+10
    exits_at(clock, T0 + 10 + IDLE)


def test_work_that_ended_counts_from_the_end_reported_not_from_when_it_was_seen():
    """A cheap request seen in progress must not restart the clock: its end is the old hold's end."""
    clock = ready_clock()
    clock.busy(T0 + 5, until=T0 + 35)
    clock.busy(T0 + 50)                # a request in progress at T0+50 ...
    assert clock.deadline(T0 + 50) is None
    clock.busy(T0 + 51, until=T0 + 35)  # ... that renewed nothing
    assert not clock.held(T0 + 51)
    exits_at(clock, T0 + 35 + IDLE)


def test_idle_after_work_without_a_reported_end_counts_from_then():
    clock = ready_clock()
    clock.busy(T0 + 5, until=T0 + 35)
    clock.busy(T0 + 50)
    clock.idle(T0 + 60)                # work of unknown end, seen over at T0+60
    exits_at(clock, T0 + 60 + IDLE)


def test_a_new_report_replaces_the_previous_one():
    clock = ready_clock()
    clock.busy(T0 + 5)                 # work in progress ...
    clock.busy(T0 + 6, until=T0 + 36)  # ... done; the connection stays usable for 30 s
    exits_at(clock, T0 + 36 + IDLE)


def test_hold_is_capped_by_max_hold():
    clock = ready_clock()
    h = clock.hold(10 * MAX_HOLD, T0)
    assert h == Hold(asked=10 * MAX_HOLD, granted=MAX_HOLD, until=T0 + MAX_HOLD) and h.capped
    exits_at(clock, T0 + MAX_HOLD + IDLE)


def test_a_hold_never_shortens_a_longer_one():
    clock = ready_clock()
    assert clock.hold(600, T0) == Hold(600, 600, T0 + 600)
    short = clock.hold(10, T0 + 100)
    assert short.granted == 10 and not short.capped and short.until == T0 + 600
    assert clock.keep_warm_until(T0 + 100) == T0 + 600
    exits_at(clock, T0 + 600 + IDLE)
    longer = clock.hold(600, T0 + 100)
    assert longer.until == T0 + 700
    exits_at(clock, T0 + 700 + IDLE)


def test_hold_zero_asks_for_nothing_and_a_past_hold_is_gone():
    clock = ready_clock()
    assert clock.hold(0, T0) == Hold(0, 0, None)
    assert clock.hold(-5, T0) == Hold(0, 0, None)
    clock.hold(10, T0)
    assert clock.keep_warm_until(T0 + 9) == T0 + 10 and clock.keep_warm_until(T0 + 10) is None
    assert clock.hold(0, T0 + 20).until is None
    exits_at(clock, T0 + IDLE + 10)    # the hold ended at T0+10, idle since T0: 10 + idle_timeout


def test_a_hold_asked_while_loading_counts_from_the_request():
    clock = LifecycleClock(IDLE, MAX_HOLD, GRACE)
    clock.hold(100, T0)
    clock.loaded(T0 + 30)
    clock.idle(T0 + 30)
    exits_at(clock, T0 + 100 + IDLE)


def test_hold_and_work_together_the_later_end_wins():
    clock = ready_clock()
    clock.hold(100, T0)
    clock.busy(T0 + 1)
    clock.idle(T0 + 500)               # work ended after the hold
    exits_at(clock, T0 + 500 + IDLE)
    clock.hold(1000, T0 + 600)         # a hold after the work
    exits_at(clock, T0 + 1600 + IDLE)


def test_unavailable_exits_after_the_grace_whatever_is_in_progress():
    clock = LifecycleClock(IDLE, MAX_HOLD, GRACE)
    clock.busy(T0)
    clock.hold(MAX_HOLD, T0)
    clock.failed(T0 + 3)
    assert clock.phase is State.UNAVAILABLE
    assert clock.deadline(T0 + 4) == T0 + 3 + GRACE
    assert clock.expired(T0 + 3 + GRACE - 1e-6) is None
    assert clock.expired(T0 + 3 + GRACE) is Reason.UNAVAILABLE
    clock.failed(T0 + 50)              # only the first failure counts
    assert clock.deadline(T0 + 60) == T0 + 3 + GRACE
    clock.loaded(T0 + 61)              # and nothing brings it back
    assert clock.phase is State.UNAVAILABLE


def test_failure_after_ready_starts_the_grace():
    clock = ready_clock()
    clock.busy(T0 + 1)
    clock.failed(T0 + 10)              # the inference worker died
    assert clock.expired(T0 + 10 + GRACE) is Reason.UNAVAILABLE


def test_deadline_if_idle_now_is_what_status_shows_from_inside_a_request():
    clock = ready_clock()
    clock.hold(50, T0)
    clock.busy(T0 + 10)
    assert clock.deadline(T0 + 20) is None
    assert clock.deadline(T0 + 20, if_idle_now=True) == T0 + 50 + IDLE   # the hold is later
    assert clock.deadline(T0 + 80, if_idle_now=True) == T0 + 80 + IDLE
    clock.busy(T0 + 90, until=T0 + 120)
    assert clock.deadline(T0 + 90, if_idle_now=True) == T0 + 120 + IDLE


def test_an_infinite_idle_timeout_never_expires():
    clock = LifecycleClock(math.inf, MAX_HOLD, GRACE)
    clock.loaded(T0)
    clock.idle(T0)
    assert clock.deadline(T0 + 1e9) is None and clock.expired(T0 + 1e9) is None


def test_zero_idle_timeout_exits_as_soon_as_nothing_holds_it():
    clock = LifecycleClock(0, MAX_HOLD, GRACE)
    clock.loaded(T0)
    clock.busy(T0, until=T0 + 30)
    assert clock.expired(T0 + 29) is None
    clock.idle(T0 + 31)
    assert clock.expired(T0 + 31) is Reason.IDLE


def test_observe_work_then_a_connection_hold_then_nothing():
    """observe() is what the main loop reports at each look: work (no known end) beats a
    connection's hold; with neither, the idle clock runs from the end of what held it last."""
    clock = ready_clock()
    clock.observe(T0 + 10, working=True, held_until=T0 + 20)   # work in progress: no exit at all
    assert clock.deadline(T0 + 10) is None
    clock.observe(T0 + 30, working=False, held_until=T0 + 40)  # work done, a connection in use until +40
    exits_at(clock, T0 + 40 + IDLE)
    clock.observe(T0 + 50, working=False, held_until=None)      # nothing: the reported end stays
    exits_at(clock, T0 + 40 + IDLE)
    clock.observe(T0 + 60, working=True, held_until=None)
    clock.observe(T0 + 70, working=False, held_until=None)      # work ended, no end reported: from now
    exits_at(clock, T0 + 70 + IDLE)
