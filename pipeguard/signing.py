"""Canonical encoding of signed messages, and signing/verification of them.

Protobuf serialisation is not canonical, so signatures never cover serialised bytes. They
cover ``canonical_bytes(message)``: a domain tag with the message's full name, then every
field that holds a non-default value, in field-number order, as (number, value) with
fixed-width integers, floats as their IEEE-754 double bits (so -0.0 and 0.0 differ),
length-prefixed strings and bytes, repeated fields as a count then their items, and nested
messages encoded the same way inside a length prefix. Every part is either fixed-width or
length-prefixed and the schema fixes each field's type, so the encoding is injective: two
messages of one type with different field values never share canonical bytes
(tests/test_signing.py checks it with hypothesis). Default-valued fields are left out (as proto3 does on the wire), so
a field added to the schema later does not change the bytes, and old signatures and
evidence bundles stay valid. The top-level ``signature`` field is left out. Any implementation can rebuild these bytes from the typed
fields alone, which is what lets an evidence bundle be re-checked offline.
"""

from __future__ import annotations

import functools
import struct
from typing import Mapping, Protocol

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from pipeguard.errors import Unauthenticated
from pipeguard.identity import Identity, PublicIdentity

# The tag names the encoding's version: bundles signed under the first encoding (which had no
# length prefix on nested messages and collapsed -0.0 into 0.0) do not verify under this one.
DOMAIN = b"pipeguard/v1/canonical-2\x00"

_INT_TYPES = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_ENUM,
}
_UINT_TYPES = {
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
}


def _encode_value(field: FieldDescriptor, value, out: bytearray) -> None:
    t = field.type
    if t in _INT_TYPES:
        out += struct.pack(">q", value)
    elif t in _UINT_TYPES:
        out += struct.pack(">Q", value)
    elif t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        out += struct.pack(">d", value)
    elif t == FieldDescriptor.TYPE_BOOL:
        out += b"\x01" if value else b"\x00"
    elif t == FieldDescriptor.TYPE_STRING:
        raw = value.encode("utf-8")
        out += struct.pack(">I", len(raw)) + raw
    elif t == FieldDescriptor.TYPE_BYTES:
        out += struct.pack(">I", len(value)) + value
    elif t == FieldDescriptor.TYPE_MESSAGE:
        inner = bytearray()
        _encode_message(value, inner, skip_signature=False)
        out += struct.pack(">I", len(inner)) + inner
    else:  # pragma: no cover - the schema uses none of the others
        raise TypeError(f"unsupported field type {t} for {field.full_name}")


@functools.cache
def _fields_in_order(descriptor: Descriptor) -> tuple[FieldDescriptor, ...]:
    return tuple(sorted(descriptor.fields, key=lambda f: f.number))


def _encode_message(msg: Message, out: bytearray, skip_signature: bool,
                    preencoded: Mapping[str, bytes] | None = None) -> None:
    """Fields in number order; fields holding their default value (0, "", empty, absent) are
    left out, so adding a field to the schema leaves every existing signature valid."""
    for field in _fields_in_order(msg.DESCRIPTOR):
        if skip_signature and field.name == "signature":
            continue
        if preencoded is not None and field.name in preencoded:
            out += preencoded[field.name]
            continue
        value = getattr(msg, field.name)
        if field.is_repeated:
            _encode_repeated(field, value, out)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if not msg.HasField(field.name):
                continue
            out += struct.pack(">I", field.number)
            _encode_value(field, value, out)
        else:
            if _is_default(field, value):
                continue
            out += struct.pack(">I", field.number)
            _encode_value(field, value, out)


_ZERO_BITS = struct.pack(">d", 0.0)


def _is_default(field: FieldDescriptor, value) -> bool:
    """Whether a singular scalar holds its default; floats by bits, so -0.0 is not 0.0."""
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return struct.pack(">d", value) == _ZERO_BITS
    return value == field.default_value


def _encode_repeated(field: FieldDescriptor, value, out: bytearray) -> None:
    if len(value) == 0:
        return
    out += struct.pack(">I", field.number)
    out += struct.pack(">I", len(value))
    for item in value:
        _encode_value(field, item, out)


def encode_field(message_type: type[Message], name: str, value) -> bytes:
    """The canonical encoding of ``value`` as repeated field ``name`` of ``message_type`` (b"" if empty).

    For a large value that many messages share (the member list of every heartbeat reply): encode
    it once and pass it to ``canonical_bytes`` / ``sign`` as ``preencoded={name: bytes}``, which then
    give exactly the bytes they would compute from the message itself.
    """
    field = message_type.DESCRIPTOR.fields_by_name[name]
    if not field.is_repeated:
        raise ValueError(f"encode_field is for repeated fields; {field.full_name} is not one")
    out = bytearray()
    _encode_repeated(field, value, out)
    return bytes(out)


def canonical_bytes(msg: Message, preencoded: Mapping[str, bytes] | None = None) -> bytes:
    """The bytes a signature over ``msg`` covers (its ``signature`` field excluded).

    ``preencoded`` maps top-level field names to ``encode_field`` results that stand in for the
    fields' values (the caller vouches that they encode what ``msg`` holds).
    """
    out = bytearray(DOMAIN)
    name = msg.DESCRIPTOR.full_name.encode()
    out += struct.pack(">I", len(name)) + name
    _encode_message(msg, out, skip_signature=True, preencoded=preencoded)
    return bytes(out)


class _Signed(Protocol):
    signature: bytes


def sign(msg: Message, identity: Identity, preencoded: Mapping[str, bytes] | None = None) -> Message:
    """Fill ``msg.signature`` with ``identity``'s signature; returns ``msg``. ``preencoded``: see
    ``canonical_bytes``."""
    msg.signature = identity.sign(canonical_bytes(msg, preencoded))
    return msg


def verify(msg: Message, signer: PublicIdentity, what: str = "") -> None:
    """Raise ``Unauthenticated`` unless ``msg.signature`` is ``signer``'s over ``msg``."""
    if not signer.verify(msg.signature, canonical_bytes(msg)):
        label = what or msg.DESCRIPTOR.name
        raise Unauthenticated(f"bad signature on {label} (claimed signer {signer.node_id})")
