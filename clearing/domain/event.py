"""Typed domain events, their catalogue, and upcasting of older schema versions.

Events are facts: frozen pydantic models with a stable type name and a schema version. The
catalogue is the single place that maps a stored `type` back to its model; an event stored
under an older schema version is upcast on read, never rewritten in the log.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo

JsonObject = dict[str, Any]
Upcaster = Callable[[JsonObject], JsonObject]


class Event(BaseModel):
    """Base of every domain event: immutable, no unknown fields, decimals kept exact."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)

    type_name: ClassVar[str] = ""
    schema_version: ClassVar[int] = 1

    def to_payload(self) -> JsonObject:
        """The JSON form stored in the log: decimals as strings, times ISO 8601 UTC."""
        return self.model_dump(mode="json")


class UnknownEventType(LookupError):
    """A stored or submitted event names a type the catalogue does not know."""

    def __init__(self, type_name: str):
        super().__init__(f"unknown event type {type_name!r}")
        self.type_name = type_name


class InvalidEventPayload(ValueError):
    """A payload does not validate against its event model."""

    def __init__(self, type_name: str, errors: list[dict[str, Any]]):
        first = errors[0] if errors else {}
        field = ".".join(str(p) for p in first.get("loc", ())) or "payload"
        reason = first.get("msg", "invalid")
        super().__init__(f"{type_name}: {field}: {reason}")
        self.type_name = type_name
        self.field = field
        self.reason = reason


class EventCatalogue:
    """Registry of event models by type name, with upcasters for older schema versions."""

    def __init__(self) -> None:
        self._models: dict[str, type[Event]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._json_readers: dict[str, tuple[int, Callable[[str], Event]]] = {}

    def register(self, model: type[Event]) -> type[Event]:
        """Class decorator: a model registers under its `type_name`, which must be unique."""
        name = model.type_name
        if not name:
            raise ValueError(f"{model.__name__} has no type_name")
        existing = self._models.get(name)
        if existing is not None and existing is not model:
            raise ValueError(f"event type {name!r} registered twice")
        self._models[name] = model
        self._json_readers.pop(name, None)
        return model

    def upcaster(self, type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: a function turning a payload of `from_version` into `from_version + 1`."""

        def decorate(fn: Upcaster) -> Upcaster:
            self._upcasters[(type_name, from_version)] = fn
            return fn

        return decorate

    def model(self, type_name: str) -> type[Event]:
        try:
            return self._models[type_name]
        except KeyError:
            raise UnknownEventType(type_name) from None

    def json_reader(self, type_name: str) -> tuple[int, Callable[[str], Event]]:
        """The current schema version of `type_name` and a function decoding a payload of that
        version straight from its stored JSON text. Every replay calls it once per event, so
        it goes to the model's compiled validator without pydantic's per-call wrapper."""
        reader = self._json_readers.get(type_name)
        if reader is None:
            model = self.model(type_name)
            validate_json = model.__pydantic_validator__.validate_json

            def read(payload: str) -> Event:
                return validate_json(payload, context=FROM_THE_LOG)  # type: ignore[no-any-return]

            reader = self._json_readers[type_name] = (model.schema_version, read)
        return reader

    def knows(self, type_name: str) -> bool:
        return type_name in self._models

    def decode(self, type_name: str, schema_version: int, payload: JsonObject) -> Event:
        """Rebuild an event from its stored form, upcasting step by step to the current version."""
        model = self.model(type_name)
        version = schema_version
        while version < model.schema_version:
            step = self._upcasters.get((type_name, version))
            if step is None:
                raise UnknownEventType(f"{type_name} v{version} (no upcaster)")
            payload = step(payload)
            version += 1
        try:
            return model.model_validate(payload, context=FROM_THE_LOG)
        except ValidationError as exc:
            raise InvalidEventPayload(type_name, exc.errors()) from None

    def validate(self, event: Event) -> None:
        """Refuse an event whose class is not the one registered under its type name."""
        if self.model(event.type_name) is not type(event):
            raise UnknownEventType(event.type_name)


FROM_THE_LOG = {"from_the_log": True}
"""Validation context for decoding a stored event: it was checked in full when it was
recorded and the hash chain vouches for it since, so whole-model rules (postings balance,
legs numbered) are not re-run on every read; field types are still parsed and checked."""


def from_the_log(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("from_the_log"))


catalogue = EventCatalogue()
"""The one catalogue of every event type this ledger records."""


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def canonical_json(value: Any) -> str:
    """Deterministic JSON text: sorted keys, no whitespace, UTF-8 characters kept.

    The hash chain and idempotency comparisons depend on the same value always having the same
    bytes, on every backend and every run. One encoder serves every call: `json.dumps` with
    these options builds a new one each time, a third of the cost of a fact's metadata.
    """
    return _CANONICAL.encode(value)


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                              default=_json_default)
