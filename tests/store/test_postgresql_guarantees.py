"""Guarantees that only PostgreSQL's concurrency can put to the test: no skipped event when
transactions commit out of sequence order, no lost or duplicated append under contention, and
the least-privilege application role."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from clearing.store.eventstore import ANY_VERSION, EventStore, PendingEvent
from clearing.store.hashchain import verify_chain
from tests.conftest import Backend, make_backend
from clearing.store.database import upgrade
from tests.store.events_for_tests import Noted, test_catalogue

T0 = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture
def pg(tmp_path):  # type: ignore[no-untyped-def]
    db = make_backend("postgresql", tmp_path)
    try:
        yield db
    finally:
        db.close()


@pytest.fixture
def pg_store(pg: Backend) -> EventStore:
    engine = pg.engine()
    upgrade(engine)
    return EventStore(engine, event_catalogue=test_catalogue)


def test_reader_never_skips_an_event_committed_late_with_a_lower_position(
    pg_store: EventStore, pg: Backend
) -> None:
    """T1 takes its position first but commits last; a reader in between must not move past
    it, and afterwards sees both exactly once, in a stable order."""
    pg_store.append([PendingEvent("s0", Noted(text="before"), "k0", T0)])
    slow_engine = pg.engine()
    slow = EventStore(slow_engine, event_catalogue=test_catalogue)
    started = threading.Event()
    release = threading.Event()
    slow_done = threading.Event()

    original = slow._append_in

    def append_then_wait(*args):  # type: ignore[no-untyped-def]
        result = original(*args)
        started.set()
        assert release.wait(10)
        return result

    slow._append_in = append_then_wait  # type: ignore[method-assign]
    thread = threading.Thread(
        target=lambda: (slow.append([PendingEvent("s1", Noted(text="slow"), "k1", T0)]),
                        slow_done.set())
    )
    thread.start()
    assert started.wait(10)
    fast = pg_store.append([PendingEvent("s2", Noted(text="fast"), "k2", T0)])

    seen_first = list(pg_store.read_all())
    assert [r.event.text for r in seen_first] == ["before"]
    checkpoint = seen_first[-1].log_position
    with pg_store.engine.connect() as conn:
        slow_position = conn.execute(text("SELECT position FROM events WHERE "
                                          "idempotency_key = 'k1'")).first()
    assert slow_position is None  # not committed yet

    release.set()
    thread.join(10)
    assert slow_done.is_set()
    after = list(pg_store.read_all(checkpoint))
    assert [r.event.text for r in after] == ["slow", "fast"]
    slow_pos = after[0].position
    assert slow_pos < fast.positions[0]  # it really took the lower position and committed last
    assert list(pg_store.read_all()) == seen_first + after  # stable order on a fresh read


def test_concurrent_writers_to_one_stream_lose_and_duplicate_nothing(pg: Backend) -> None:
    writers, appends_each = 8, 25
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        store = EventStore(pg.engine(), event_catalogue=test_catalogue)
        try:
            for i in range(appends_each):
                store.append([PendingEvent("shared", Noted(text=f"{worker}-{i}"),
                                           f"w{worker}-{i}", T0)], {"shared": ANY_VERSION})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    engine = pg.engine()
    upgrade(engine)
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    store = EventStore(engine, event_catalogue=test_catalogue)
    read = list(store.read_all())
    assert len(read) == writers * appends_each
    assert sorted(r.stream_version for r in read) == list(range(1, writers * appends_each + 1))
    assert [r.stream_version for r in read] == sorted(r.stream_version for r in read)
    assert len({r.event.text for r in read}) == writers * appends_each
    assert verify_chain(engine).ok


def test_wide_and_narrow_appends_to_shared_streams_interleave_without_loss(pg: Backend
                                                                          ) -> None:
    """Appends of many streams lock every stream at once, appends of a few lock their own:
    run side by side on overlapping streams, no version is duplicated or skipped, nothing is
    lost, no deadlock, and each stream's versions follow the log order."""
    streams = [f"s{i}" for i in range(300)]  # more buckets than an append locks one by one
    rounds = 6
    errors: list[BaseException] = []

    def wide(worker: int) -> None:
        store = EventStore(pg.engine(), event_catalogue=test_catalogue)
        try:
            for r in range(rounds):
                store.append([PendingEvent(s, Noted(text=f"wide{worker}-{r}-{s}"),
                                           f"wide{worker}-{r}-{s}", T0) for s in streams])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def narrow(worker: int) -> None:
        store = EventStore(pg.engine(), event_catalogue=test_catalogue)
        try:
            for r in range(rounds * 5):
                chosen = [streams[(worker * 7 + r * 13 + k) % len(streams)] for k in range(3)]
                store.append([PendingEvent(s, Noted(text=f"narrow{worker}-{r}-{s}"),
                                           f"narrow{worker}-{r}-{s}", T0) for s in chosen],
                             {s: ANY_VERSION for s in chosen})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    engine = pg.engine()
    upgrade(engine)
    threads = ([threading.Thread(target=wide, args=(w,)) for w in range(2)]
               + [threading.Thread(target=narrow, args=(w,)) for w in range(4)])
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    read = list(EventStore(engine, event_catalogue=test_catalogue).read_all())
    assert len(read) == 2 * rounds * len(streams) + 4 * rounds * 5 * 3
    versions: dict[str, list[int]] = {}
    for r in read:
        versions.setdefault(r.stream_id, []).append(r.stream_version)
    for stream_versions in versions.values():
        assert stream_versions == list(range(1, len(stream_versions) + 1))
    assert verify_chain(engine).ok


def test_racing_duplicates_of_one_key_write_once(pg: Backend) -> None:
    engine = pg.engine()
    upgrade(engine)
    results = []

    def write() -> None:
        store = EventStore(pg.engine(), event_catalogue=test_catalogue)
        results.append(store.append([PendingEvent("dep", Noted(text="same"), "ref-1", T0)]))

    threads = [threading.Thread(target=write) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(r.written for r in results) == 1
    assert len({r.positions for r in results}) == 1
    assert EventStore(engine, event_catalogue=test_catalogue).count() == 1


@pytest.mark.parametrize("statement", ["UPDATE events SET type = 'x'", "DELETE FROM events",
                                       "TRUNCATE events"])
def test_application_role_may_only_insert_and_select_events(pg_store: EventStore,
                                                           statement: str) -> None:
    pg_store.append([PendingEvent("a", Noted(text="x"), "k", T0)])
    with pg_store.engine.connect() as conn:
        conn.execute(text("SET ROLE clearing_app"))
        assert conn.execute(text("SELECT count(*) FROM events")).scalar() == 1
        with pytest.raises(DBAPIError, match="permission denied"):
            conn.execute(text(statement))
        conn.rollback()
    assert pg_store.count() == 1


def test_application_role_can_append_and_read(pg_store: EventStore) -> None:
    @__import__("sqlalchemy").event.listens_for(pg_store.engine, "connect")
    def as_app(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        with dbapi_conn.cursor() as cur:
            cur.execute("SET ROLE clearing_app")
        dbapi_conn.commit()

    pg_store.engine.dispose()
    pg_store.append([PendingEvent("a", Noted(text="as app"), "k", T0)])
    assert [r.event.text for r in pg_store.read_all()] == ["as app"]
    with pg_store.engine.connect() as conn:
        assert conn.execute(text("SELECT current_user")).scalar() == "clearing_app"


def test_owner_is_refused_truncate_by_trigger(pg_store: EventStore) -> None:
    pg_store.append([PendingEvent("a", Noted(text="x"), "k", T0)])
    with pytest.raises(DBAPIError, match="append-only"):
        with pg_store.engine.begin() as conn:
            conn.execute(text("TRUNCATE events"))
    assert pg_store.count() == 1


def test_an_unrelated_open_transaction_does_not_hold_readers_back(
    pg_store: EventStore, pg: Backend
) -> None:
    """Only in-flight event writers bound a read: an analyst's open transaction that wrote
    elsewhere must not hide newly committed events."""
    other = pg.engine()
    with other.connect() as conn:
        conn.execute(text("CREATE TEMP TABLE scratch (x int)"))
        conn.execute(text("INSERT INTO scratch VALUES (1)"))  # this transaction now has an id
        pg_store.append([PendingEvent("s", Noted(text="after"), "k-after", T0)])
        assert [r.event.text for r in pg_store.read_all()] == ["after"]
        conn.rollback()


def test_the_ledger_works_as_the_application_role_and_cannot_change_the_log(
    pg: Backend,
) -> None:
    from clearing.app import Ledger

    ledger = Ledger.open(pg.url)
    with ledger.engine.connect() as conn:
        assert conn.execute(text("SELECT current_user")).scalar() == "clearing_app"
    EventStore(ledger.engine, event_catalogue=test_catalogue).append(
        [PendingEvent("a", Noted(text="x"), "k", T0)])
    for statement in ("UPDATE events SET type = 'x'", "DELETE FROM events", "TRUNCATE events"):
        with pytest.raises(DBAPIError, match="permission denied"):
            with ledger.engine.begin() as conn:
                conn.execute(text(statement))
    assert ledger.store.count() == 1
    owner = Ledger.open(pg.url, as_application=False)
    with owner.engine.connect() as conn:
        assert conn.execute(text("SELECT current_user")).scalar() != "clearing_app"
