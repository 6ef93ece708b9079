"""Protobuf messages -> plain Python values (dicts, lists, ints, floats, str, datetime).

Unlike google.protobuf.json_format.MessageToDict, int64 fields stay ints (not strings), NaN stays a
float, every field is present (unset `optional` fields and unset timestamps are None), enum values
become the short lower-case names the CLI prints (JOB_STATE_SUCCEEDED -> "succeeded",
SCORER_EXACT_MATCH -> "exact_match", JobEvent.KIND_PROGRESS -> "progress"), and
google.protobuf.Timestamp becomes a timezone-aware datetime (None when unset).
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Dict

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

_TIMESTAMP = "google.protobuf.Timestamp"


def enum_name(enum: EnumDescriptor, number: int) -> str:
    """The short lower-case name of an enum value: the common prefix of the enum's values removed
    (JOB_STATE_, SCORER_, KIND_). An unknown number gives its decimal string."""
    value = enum.values_by_number.get(number)
    if value is None:
        return str(number)
    names = [v.name for v in enum.values]
    prefix = _common_prefix(names)
    name = value.name[len(prefix) :] if len(prefix) < len(value.name) else value.name
    return name.lower()


def enum_number(enum: EnumDescriptor, name: str) -> int:
    """Inverse of enum_name: accepts the short name ("succeeded") or the full one."""
    prefix = _common_prefix([v.name for v in enum.values])
    for candidate in (name.upper(), prefix + name.upper()):
        value = enum.values_by_name.get(candidate)
        if value is not None:
            return value.number
    choices = ", ".join(enum_name(enum, v.number) for v in enum.values if v.number != 0)
    raise ValueError(f"unknown {enum.name} {name!r} (one of: {choices})")


def _common_prefix(names: list) -> str:
    if len(names) < 2:
        return ""
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    # Cut at the last underscore so that JOB_STATE_ stays whole.
    return prefix[: prefix.rfind("_") + 1]


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_name(field.enum_type, value)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return to_python(value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return value.decode("utf-8", errors="replace")
    return value


def to_python(message: Message) -> Any:
    """The message as a dict of every field (see the module docstring), a Timestamp as datetime."""
    descriptor: Descriptor = message.DESCRIPTOR
    if descriptor.full_name == _TIMESTAMP:
        if message.seconds == 0 and message.nanos == 0:
            return None
        return message.ToDatetime().replace(tzinfo=_dt.timezone.utc)
    out: Dict[str, Any] = {}
    for field in descriptor.fields:
        value = getattr(message, field.name)
        if field.label == FieldDescriptor.LABEL_REPEATED:
            out[field.name] = [_scalar(field, v) for v in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.full_name == _TIMESTAMP:
                out[field.name] = to_python(value) if message.HasField(field.name) else None
            else:
                out[field.name] = to_python(value)
        elif _has_presence(field) and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _scalar(field, value)
    return out


def _has_presence(field: FieldDescriptor) -> bool:
    """True for proto3 `optional` scalars (their unset state is meaningful)."""
    oneof = field.containing_oneof
    return oneof is not None and oneof.name.startswith("_") and len(oneof.fields) == 1
