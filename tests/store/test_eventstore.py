"""The event store's contract, run on SQLite and PostgreSQL alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError

from clearing.domain.event import Event, EventCatalogue, InvalidEventPayload, UnknownEventType
from clearing.store.errors import (
    ConcurrencyConflict,
    DuplicateKeyInAppend,
    EmptyAppend,
    IdempotencyConflict,
    PayloadTooLarge,
)
from clearing.store.event_ids import event_id_for
from clearing.store.eventstore import (
    ANY_VERSION,
    NO_STREAM,
    PAYLOAD_BYTES_MAX,
    START,
    EventStore,
    LogFilter,
    PendingEvent,
)
from clearing.store.hashchain import verify_chain
from clearing.store.tables import events
from tests.store.events_for_tests import Counted, Noted, test_catalogue

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


class SteppingClock:
    def __init__(self, start: datetime = T0):
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def noted(stream: str, key: str, text_: str = "x", at: datetime = T0) -> PendingEvent:
    return PendingEvent(stream, Noted(text=text_), key, at, {"actor": "test"})


@pytest.fixture
def store(engine) -> EventStore:  # type: ignore[no-untyped-def]
    return EventStore(engine, event_catalogue=test_catalogue, clock=SteppingClock())


def event_count(store: EventStore) -> int:
    return store.count()


def test_appended_events_read_back_typed_and_in_order(store: EventStore) -> None:
    result = store.append([noted("a", "k1", "first"), noted("b", "k2", "second"),
                           PendingEvent("a", Counted(n=3), "k3", T0)])
    assert result.written == 3 and not result.already_done
    read = list(store.read_all())
    assert [r.position for r in read] == list(result.positions)
    assert [r.event for r in read] == [Noted(text="first"), Noted(text="second"), Counted(n=3)]
    assert [(r.stream_id, r.stream_version) for r in read] == [("a", 1), ("b", 1), ("a", 2)]
    assert read[0].metadata == {"actor": "test"}
    assert read[0].effective_at == T0 and read[0].recorded_at == T0
    assert store.stream_version("a") == 2 and store.stream_version("nope") == 0


def test_decimals_are_kept_exact_as_strings(store: EventStore) -> None:
    store.append([PendingEvent("a", Noted(text="m", amount=Decimal("0.10000001")), "k", T0)])
    with store.engine.connect() as conn:
        payload = conn.execute(select(events.c.payload)).scalar_one()
    assert '"amount":"0.10000001"' in payload
    assert next(store.read_all()).event.amount == Decimal("0.10000001")


def test_expected_version_conflict_writes_nothing(store: EventStore) -> None:
    store.append([noted("a", "k1")], {"a": NO_STREAM})
    with pytest.raises(ConcurrencyConflict) as err:
        store.append([noted("a", "k2"), noted("b", "k3")], {"a": 0, "b": NO_STREAM})
    assert (err.value.stream_id, err.value.expected, err.value.actual) == ("a", 0, 1)
    assert event_count(store) == 1
    store.append([noted("a", "k2"), noted("b", "k3")], {"a": 1, "b": ANY_VERSION})
    assert event_count(store) == 3


def test_expected_version_of_a_stream_without_new_events_is_checked(store: EventStore) -> None:
    store.append([noted("account", "k1")])
    with pytest.raises(ConcurrencyConflict):
        store.append([noted("trade", "k2")], {"account": 5})
    assert event_count(store) == 1


def test_same_idempotency_key_same_content_is_a_no_op_returning_original_positions(
    store: EventStore,
) -> None:
    first = store.append([noted("a", "k1"), noted("a", "k2")])
    again = store.append([noted("a", "k1"), noted("a", "k2")])
    assert again.already_done and again.positions == first.positions
    partly = store.append([noted("a", "k2"), noted("a", "k3")])
    assert partly.written == 1 and partly.positions[0] == first.positions[1]
    assert event_count(store) == 3


def test_same_idempotency_key_with_other_content_is_refused(store: EventStore) -> None:
    first = store.append([noted("a", "k1", "original")])
    with pytest.raises(IdempotencyConflict) as err:
        store.append([noted("a", "k9"), noted("a", "k1", "changed")])
    assert err.value.key == "k1" and err.value.index == 1
    assert err.value.position == first.positions[0]
    assert event_count(store) == 1


@pytest.mark.parametrize(
    "bad, error",
    [
        ([], EmptyAppend),
        ([noted("a", "k"), noted("b", "k")], DuplicateKeyInAppend),
        ([noted("a", "k", "x" * (PAYLOAD_BYTES_MAX + 1))], PayloadTooLarge),
    ],
    ids=["empty", "key-twice", "oversized"],
)
def test_bad_appends_are_typed_errors_and_write_nothing(store, bad, error) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error):
        store.append(bad)
    assert event_count(store) == 0


def test_unknown_event_type_is_refused(store: EventStore) -> None:
    class Stray(Event):
        type_name = "Stray"

    with pytest.raises(UnknownEventType):
        store.append([PendingEvent("a", Stray(), "k", T0)])
    with pytest.raises(UnknownEventType):
        PendingEvent.from_payload("a", "Nope", {}, idempotency_key="k", effective_at=T0,
                                  event_catalogue=test_catalogue)
    assert event_count(store) == 0


def test_payload_failing_validation_is_refused(store: EventStore) -> None:
    with pytest.raises(InvalidEventPayload) as err:
        PendingEvent.from_payload("a", "Counted", {"n": -1}, idempotency_key="k",
                                  effective_at=T0, event_catalogue=test_catalogue)
    assert err.value.field == "n"
    ok = PendingEvent.from_payload("a", "Counted", {"n": 2}, idempotency_key="k",
                                   effective_at=T0, event_catalogue=test_catalogue)
    store.append([ok])
    assert next(store.read_all()).event == Counted(n=2)


def test_older_schema_versions_are_upcast_on_read(engine) -> None:  # type: ignore[no-untyped-def]
    old = EventCatalogue()

    @old.register
    class NotedV1(Event):
        type_name = "Noted"
        schema_version = 1
        note: str

    EventStore(engine, event_catalogue=old).append([PendingEvent("a", NotedV1(note="hi"),
                                                                 "k", T0)])
    read = list(EventStore(engine, event_catalogue=test_catalogue).read_all())
    assert read[0].schema_version == 1
    assert read[0].event == Noted(text="hi", amount=Decimal("0"))


def test_reads_are_paged_resumable_and_bounded(engine) -> None:  # type: ignore[no-untyped-def]
    clock = SteppingClock()
    store = EventStore(engine, event_catalogue=test_catalogue, clock=clock)
    for i in range(7):
        clock.now = T0 + timedelta(hours=i)
        store.append([noted("s" if i % 2 else "t", f"k{i}", str(i), at=T0 + timedelta(days=i))])
    everything = list(store.read_all(page_size=2))
    assert [r.event.text for r in everything] == [str(i) for i in range(7)]
    resumed = list(store.read_all(everything[2].log_position, page_size=3))
    assert resumed == everything[3:]
    assert len(list(store.read_all(limit=4, page_size=3))) == 4
    until = list(store.read_all(bounds=LogFilter(until=everything[4].log_position)))
    assert until == everything[:5]
    effective = store.read_all(bounds=LogFilter(effective_until=T0 + timedelta(days=2)))
    assert [r.event.text for r in effective] == ["0", "1", "2"]
    known = store.read_all(bounds=LogFilter(recorded_until=T0 + timedelta(hours=3, minutes=1)))
    assert [r.event.text for r in known] == ["0", "1", "2", "3"]
    by_stream = store.read_all(bounds=LogFilter(stream_id="s"))
    assert [r.event.text for r in by_stream] == ["1", "3", "5"]
    store.append([PendingEvent("c", Counted(n=1), "c1", T0)])
    by_type = list(store.read_all(bounds=LogFilter(types=("Counted",))))
    assert [r.event for r in by_type] == [Counted(n=1)]
    assert [r.stream_version for r in store.read_stream("s")] == [1, 2, 3]
    assert store.head() == by_type[0].log_position
    assert list(store.read_all(store.head())) == []


@pytest.mark.parametrize("statement", ["UPDATE events SET type = 'Edited'",
                                       "DELETE FROM events"])
def test_database_refuses_update_and_delete_of_events(store: EventStore, statement: str) -> None:
    store.append([noted("a", "k1")])
    with pytest.raises(DBAPIError, match="append-only"):
        with store.engine.begin() as conn:
            conn.execute(text(statement))
    assert [r.event for r in store.read_all()] == [Noted(text="x")]


def test_hash_chain_verifies_and_names_the_first_tampered_position(store: EventStore,
                                                                    backend) -> None:  # type: ignore[no-untyped-def]
    result = store.append([noted("a", f"k{i}", str(i)) for i in range(5)])
    assert verify_chain(store.engine).ok
    target = result.positions[2]
    tamper_payload(store.engine, backend.kind, target, '{"amount":"0","text":"forged"}')
    report = verify_chain(store.engine)
    assert not report.ok
    assert report.first_bad_position == target
    assert str(target) in report.reason


def test_an_event_id_its_position_does_not_give_is_named_by_verify(store: EventStore,
                                                                    backend) -> None:  # type: ignore[no-untyped-def]
    # Ids are unique because each is made from its position (PostgreSQL keeps no index on
    # them): verify holds every stored id to its position and key.
    result = store.append([noted("a", f"k{i}", str(i)) for i in range(3)])
    forged = event_id_for(result.positions[0], "k1")  # the first event's position in it
    tamper_payload(store.engine, backend.kind, result.positions[1], forged, column="event_id")
    report = verify_chain(store.engine)
    assert not report.ok
    assert report.first_bad_position == result.positions[1]
    assert forged in report.reason


def tamper_payload(engine, kind: str, position: int, value: str,  # type: ignore[no-untyped-def]
                   column: str = "payload") -> None:
    """Edit an event behind the triggers' back, as an attacker with owner rights could."""
    edit = update(events).where(events.c.position == position).values({column: value})
    with engine.begin() as conn:
        if kind == "postgresql":
            conn.execute(text("ALTER TABLE events DISABLE TRIGGER USER"))
            conn.execute(edit)
            conn.execute(text("ALTER TABLE events ENABLE TRIGGER USER"))
        else:
            conn.execute(text("DROP TRIGGER events_refuse_update"))
            conn.execute(edit)
            conn.execute(text(
                "CREATE TRIGGER events_refuse_update BEFORE UPDATE ON events BEGIN "
                "SELECT RAISE(ABORT, 'events are append-only: UPDATE refused'); END"))


def test_positions_are_unique_and_versions_contiguous(store: EventStore) -> None:
    for i in range(3):
        store.append([noted("a", f"a{i}"), noted("b", f"b{i}")])
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count(func.distinct(events.c.position)))).scalar() == 6
    assert [r.stream_version for r in store.read_stream("b")] == [1, 2, 3]


def test_text_with_tabs_newlines_and_backslashes_round_trips_exactly(store: EventStore) -> None:
    awkward = "tab\there\nnew line\\back\\slash\r\u00e9\u20ac"
    store.append([PendingEvent("odd\tstream", Noted(text=awkward), "key\\with\ttab", T0,
                               {"note": awkward})])
    read = next(store.read_all())
    assert read.event == Noted(text=awkward)
    assert read.metadata == {"note": awkward}
    assert (read.stream_id, read.idempotency_key) == ("odd\tstream", "key\\with\ttab")
    assert verify_chain(store.engine).ok
