"""Wearing sessions: new/update/end with stable ids, meaningful-change updates, rate limiting."""
from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.events import Event, EventTracker, Observation, TrackerConfig


def obs(t: float, wearer: str | None = "alice", conf: float = 0.9, activity: str | None = "sitting",
        hr: float | None = 70.0, live: bool = True) -> Observation:
    return Observation(t=t, wearer=wearer, confidence=conf, activity=activity, activity_confidence=0.8,
                       heart_rate_bpm=hr, quality=0.9, live=live, sensors={"ecg": True, "imu": True})


def tracker(**kw) -> EventTracker:
    counter = itertools.count(1)
    return EventTracker(TrackerConfig(**kw), id_factory=lambda: f"s{next(counter)}")


def feed(tr: EventTracker, observations: list[Observation]) -> list[Event]:
    return [e for o in observations for e in tr.observe(o)]


def test_session_lifecycle_new_update_end_with_one_stable_id() -> None:
    tr = tracker(min_update_interval_s=5, hr_delta_bpm=5)
    events = feed(tr, [obs(0), obs(1), obs(2, hr=72), obs(10, activity="walking"), obs(11, live=False)])
    assert [e.type for e in events] == ["new", "update", "end"]
    assert {e.id for e in events} == {"s1"}
    assert [e.event_id for e in events] == ["s1:1", "s1:2", "s1:3"]
    new, update, end = events
    assert new.before is None and new.after.wearer == "alice" and new.after.end_time is None
    assert update.before.activity == "sitting" and update.after.activity == "walking"
    assert end.after.end_time == 11 and end.before == update.after
    # JSON-able, Frigate-shaped
    d = json.loads(json.dumps(update.to_dict()))
    assert set(d) == {"id", "event_id", "type", "before", "after"} and d["after"]["activity"] == "walking"


def test_new_id_after_end_and_when_the_wearer_changes() -> None:
    tr = tracker()
    events = feed(tr, [obs(0), obs(1, live=False), obs(2), obs(3, wearer="bob")])
    assert [(e.type, e.id, e.after.wearer) for e in events] == [
        ("new", "s1", "alice"), ("end", "s1", "alice"), ("new", "s2", "alice"), ("end", "s2", "alice"), ("new", "s3", "bob")]


def test_unknown_wearer_starts_a_session_and_identification_keeps_its_id() -> None:
    tr = tracker(min_update_interval_s=0)
    events = feed(tr, [obs(0, wearer=None), obs(1, wearer="unknown", conf=0.3), obs(2, wearer="alice", conf=0.9)])
    assert [(e.type, e.id, e.after.wearer) for e in events] == [("new", "s1", "unknown"), ("update", "s1", "alice")]


def test_no_session_without_a_live_ecg_or_a_verdict() -> None:
    tr = tracker()
    assert feed(tr, [obs(0, live=False), obs(1, wearer=None), obs(2, wearer=None, live=False)]) == []
    assert tr.session is None


def test_update_only_on_meaningful_change() -> None:
    tr = tracker(min_update_interval_s=0, hr_delta_bpm=5)
    events = feed(tr, [
        obs(0, hr=70), obs(1, hr=74), obs(2, hr=70.5), obs(3, conf=0.85),  # small HR wobble, same band: nothing
        obs(4, hr=76),  # > 5 bpm from the last *emitted* 70: update
        obs(5, hr=76, conf=0.6),  # high -> medium band: update
        obs(6, hr=76, conf=0.6, activity=None),  # no activity verdict: keep the last one, no update
    ])
    assert [e.type for e in events] == ["new", "update", "update"]
    assert events[1].after.heart_rate_bpm == 76 and events[2].after.confidence_band == "medium"
    assert tr.session is not None and tr.session.activity == "sitting"


def test_updates_are_rate_limited_but_never_lost() -> None:
    tr = tracker(min_update_interval_s=10, hr_delta_bpm=5)
    events = feed(tr, [obs(0), obs(1, activity="walking"), obs(2, activity="running"), obs(3, hr=90),
                       obs(10.5, activity="running", hr=90)])
    assert [e.type for e in events] == ["new", "update"]
    assert events[1].after.activity == "running" and events[1].after.heart_rate_bpm == 90  # the latest state, coalesced


def test_stale_session_ends_at_its_last_observation() -> None:
    tr = tracker(stale_after_s=30)
    assert [e.type for e in feed(tr, [obs(0), obs(5)])] == ["new"]
    assert tr.expire(20) == []
    ended = tr.expire(40)
    assert [e.type for e in ended] == ["end"] and ended[0].after.end_time == 5
    assert [e.type for e in tr.observe(obs(41))] == ["new"] and tr.session.id == "s2"


def test_close_ends_the_open_session() -> None:
    tr = tracker()
    feed(tr, [obs(0)])
    assert [e.type for e in tr.close(3)] == ["end"] and tr.session is None and tr.close(4) == []


observation_strategy = st.builds(
    lambda dt, wearer, conf, act, hr, live: (dt, wearer, conf, act, hr, live),
    st.floats(0.1, 20), st.sampled_from([None, "unknown", "alice", "bob"]), st.floats(0, 1),
    st.sampled_from([None, "sitting", "walking"]), st.one_of(st.none(), st.floats(40, 180)), st.booleans())


@settings(max_examples=150, deadline=None)
@given(st.lists(observation_strategy, max_size=60))
def test_invariants_hold_for_any_observation_stream(steps) -> None:
    tr = tracker(min_update_interval_s=5, stale_after_s=30)
    t, events = 0.0, []
    for dt, wearer, conf, act, hr, live in steps:
        t += dt
        events += tr.observe(obs(t, wearer=wearer, conf=conf, activity=act, hr=hr, live=live))
    events += tr.close(t + 1)
    assert len({e.event_id for e in events}) == len(events)
    open_id = None
    last_emit: dict[str, float] = {}
    for e in events:
        if e.type == "new":
            assert open_id is None, "a session started while another was open"
            open_id = e.id
            assert e.id not in last_emit, "a session id was reused"
        else:
            assert e.id == open_id, "update/end for a session that is not open"
        if e.type == "update":
            assert e.after.last_seen - last_emit[e.id] >= 5, "updates closer than min_update_interval_s"
        if e.type == "end":
            open_id = None
        last_emit[e.id] = e.after.last_seen
    assert open_id is None
