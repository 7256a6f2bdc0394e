"""Canonical bytes of signed messages, signing and verification."""

from __future__ import annotations

import pytest

from pipeguard.errors import Unauthenticated
from pipeguard.identity import Identity
from pipeguard.signing import canonical_bytes, encode_field, sign, verify
from pipeguard.v1 import pipeguard_pb2 as pb

pytestmark = pytest.mark.unit


def commitment() -> pb.TensorCommitment:
    header = pb.TensorHeader(run_id="run-1", step=7, micro_batch=2, stage=1, direction=pb.DIRECTION_FORWARD,
                             sender="a" * 32, receiver="b" * 32, dtype=pb.DTYPE_FLOAT32, shape=[4, 32, 64])
    return pb.TensorCommitment(header=header, payload_digest=b"\x11" * 32)


def heartbeat() -> pb.HeartbeatRequest:
    req = pb.HeartbeatRequest(node_id="n" * 32, seq=9, tensors_sent=3, tensors_received=4, tensors_rejected=1)
    req.peers.add(peer="p" * 32, accepted=4, rejected=1, last_reason="UNAUTHENTICATED")
    req.peers.add(peer="q" * 32, accepted=0, rejected=0)
    return req


def assign() -> pb.AssignRequest:
    req = pb.AssignRequest(run_id="run-1", epoch=2, stage=1, num_stages=3, node_id="n" * 32, data_digest=b"d" * 32)
    req.model.n_layer = 3
    req.train.lr = 3e-3
    req.next.CopyFrom(pb.PeerInfo(node_id="x" * 32, address="127.0.0.1:1", public_key=b"k" * 32))
    return req


def test_canonical_bytes_are_stable_across_builds_and_wire_round_trips():
    a, b = commitment(), commitment()
    assert canonical_bytes(a) == canonical_bytes(b)
    parsed = pb.TensorCommitment.FromString(a.SerializeToString())
    assert canonical_bytes(parsed) == canonical_bytes(a)


def test_canonical_bytes_exclude_signature():
    msg = commitment()
    before = canonical_bytes(msg)
    msg.signature = b"\x00" * 64
    assert canonical_bytes(msg) == before


def _replace_shape(header: pb.TensorHeader, shape: list[int]) -> None:
    del header.shape[:]
    header.shape.extend(shape)


def _move_last_peer_first(req: pb.HeartbeatRequest) -> None:
    peers = [pb.PeerCounters(peer=p.peer, accepted=p.accepted, rejected=p.rejected, last_reason=p.last_reason)
             for p in req.peers]
    del req.peers[:]
    req.peers.extend(peers[-1:] + peers[:-1])


MUTATIONS = {
    "header.run_id": (commitment, lambda m: setattr(m.header, "run_id", "run-2")),
    "header.step": (commitment, lambda m: setattr(m.header, "step", 8)),
    "header.micro_batch": (commitment, lambda m: setattr(m.header, "micro_batch", 3)),
    "header.stage": (commitment, lambda m: setattr(m.header, "stage", 2)),
    "header.direction": (commitment, lambda m: setattr(m.header, "direction", pb.DIRECTION_BACKWARD)),
    "header.sender": (commitment, lambda m: setattr(m.header, "sender", "c" * 32)),
    "header.receiver": (commitment, lambda m: setattr(m.header, "receiver", "c" * 32)),
    "header.dtype": (commitment, lambda m: setattr(m.header, "dtype", pb.DTYPE_FLOAT16)),
    "header.shape[1]": (commitment, lambda m: m.header.shape.__setitem__(1, 33)),
    "header.shape appended": (commitment, lambda m: m.header.shape.append(1)),
    "header.shape reordered": (commitment, lambda m: _replace_shape(m.header, [32, 4, 64])),
    "payload_digest": (commitment, lambda m: setattr(m, "payload_digest", b"\x12" + b"\x11" * 31)),
    "header removed": (commitment, lambda m: m.ClearField("header")),
    "peers[0].rejected": (heartbeat, lambda m: setattr(m.peers[0], "rejected", 2)),
    "peers[1].last_reason": (heartbeat, lambda m: setattr(m.peers[1], "last_reason", "DATA_LOSS")),
    "peers reordered": (heartbeat, _move_last_peer_first),
    "peer removed": (heartbeat, lambda m: m.peers.__delitem__(-1)),
    "seq": (heartbeat, lambda m: setattr(m, "seq", 10)),
    "next.address": (assign, lambda m: setattr(m.next, "address", "127.0.0.1:2")),
    "prev set to defaults": (assign, lambda m: m.prev.SetInParent()),
    "model.n_layer": (assign, lambda m: setattr(m.model, "n_layer", 4)),
    "train.lr": (assign, lambda m: setattr(m.train, "lr", 3.0000001e-3)),
}


@pytest.mark.parametrize("field", sorted(MUTATIONS))
def test_canonical_bytes_change_when_any_field_changes(field):
    build, mutate = MUTATIONS[field]
    msg = build()
    before = canonical_bytes(msg)
    mutate(msg)
    assert canonical_bytes(msg) != before, f"changing {field} must change what the signature covers"


def test_canonical_bytes_cannot_shift_bytes_between_fields():
    a = pb.TensorHeader(run_id="ab", sender="c")
    b = pb.TensorHeader(run_id="a", sender="bc")
    assert canonical_bytes(a) != canonical_bytes(b)


def test_canonical_bytes_separate_message_types():
    """A signature over one message type can never be replayed as another with the same fields."""
    a = pb.AbortStepRequest(run_id="r", step=3, node_id="n")
    b = pb.FetchStateRequest(run_id="r", node_id="n")
    assert canonical_bytes(a) != canonical_bytes(b)
    assert b"pipeguard.v1.AbortStepRequest" in canonical_bytes(a)


def test_sign_then_verify_round_trip():
    ident = Identity.generate()
    msg = sign(heartbeat(), ident)
    assert len(msg.signature) == 64
    verify(msg, ident.public())
    # survives the wire
    verify(pb.HeartbeatRequest.FromString(msg.SerializeToString()), ident.public())


@pytest.mark.parametrize("field", ["seq", "peers[0].rejected", "peer removed"])
def test_verify_rejects_tampered_message(field):
    ident = Identity.generate()
    build, mutate = MUTATIONS[field]
    msg = sign(build(), ident)
    mutate(msg)
    with pytest.raises(Unauthenticated, match="bad signature on heartbeat"):
        verify(msg, ident.public(), what="heartbeat")


def test_verify_rejects_wrong_signer_and_missing_signature():
    alice, mallory = Identity.generate(), Identity.generate()
    msg = sign(commitment(), alice)
    with pytest.raises(Unauthenticated, match=mallory.node_id):
        verify(msg, mallory.public())
    msg.signature = b""
    with pytest.raises(Unauthenticated):
        verify(msg, alice.public())
    msg.signature = b"\x00" * 64
    with pytest.raises(Unauthenticated):
        verify(msg, alice.public())


@pytest.mark.parametrize("count", [0, 1, 3])
def test_a_preencoded_repeated_field_gives_the_same_bytes_and_a_valid_signature(count):
    members = [pb.PeerInfo(node_id=f"{i}" * 32, address=f"127.0.0.1:{7100 + i}", public_key=bytes([i]) * 32)
               for i in range(count)]
    reply = pb.HeartbeatReply(role=pb.ROLE_STANDBY, stage=1, step=4, banned=["b" * 32], seq=12, members_version=7)
    reply.members.extend(members)
    encoded = encode_field(pb.HeartbeatReply, "members", members)
    assert canonical_bytes(reply, preencoded={"members": encoded}) == canonical_bytes(reply)
    coordinator = Identity.generate()
    verify(pb.HeartbeatReply.FromString(sign(reply, coordinator, preencoded={"members": encoded}).SerializeToString()),
           coordinator.public())
    with pytest.raises(ValueError):
        encode_field(pb.HeartbeatReply, "seq", 3)


# --- injectivity -----------------------------------------------------------------------------
# A signature binds exactly one message: two messages of one type whose fields differ must never
# share canonical bytes, or a signer's claim about one could be presented as a claim about the other.

from google.protobuf.descriptor import FieldDescriptor  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SMALL_STRINGS = st.sampled_from(["", "a", "b", "ab", "\x00", "a\x00"])
_SMALL_BYTES = st.sampled_from([b"", b"\x00", b"\x01", b"\x00\x00\x00\x01", b"ab"])
_FLOATS = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5e-324, float("inf")])


def _scalar(field: FieldDescriptor):
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return _SMALL_STRINGS
    if t == FieldDescriptor.TYPE_BYTES:
        return _SMALL_BYTES
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return _FLOATS
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED32,
             FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2)
    return st.integers(-1, 2)


@st.composite
def _message(draw, cls, depth=0):
    """A message of ``cls`` with a few fields set from tiny value sets (so collisions are likely)."""
    msg = cls()
    fields = [f for f in cls.DESCRIPTOR.fields if f.name != "signature"]
    for field in draw(st.lists(st.sampled_from(fields), max_size=4, unique=True)) if fields else []:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2:
                continue
            sub_cls = type(getattr(cls(), field.name) if not field.is_repeated else getattr(cls(), field.name).add())
            if field.is_repeated:
                for item in draw(st.lists(_message(sub_cls, depth + 1), max_size=3)):
                    getattr(msg, field.name).add().CopyFrom(item)
            else:
                getattr(msg, field.name).CopyFrom(draw(_message(sub_cls, depth + 1)))
        elif field.is_repeated:
            getattr(msg, field.name).extend(draw(st.lists(_scalar(field), max_size=3)))
        else:
            setattr(msg, field.name, draw(_scalar(field)))
    return msg


_TYPES = [pb.HeartbeatRequest, pb.StepReport, pb.AssignRequest, pb.TensorHeader, pb.AuditRequest,
          pb.AuditVerdict, pb.HeartbeatReply]


@pytest.mark.parametrize("cls", _TYPES, ids=lambda c: c.DESCRIPTOR.name)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_different_messages_never_share_canonical_bytes(cls, data):
    msgs = data.draw(st.lists(_message(cls), min_size=2, max_size=12))
    seen: dict[bytes, bytes] = {}
    for msg in msgs:
        wire = msg.SerializeToString(deterministic=True)
        key = canonical_bytes(msg)
        assert seen.setdefault(key, wire) == wire, f"two {cls.DESCRIPTOR.name}s share canonical bytes"


def test_item_boundaries_of_repeated_messages_are_bound():
    """The first encoding had no length on sub-messages: these two peer lists shared bytes."""
    a, b = pb.HeartbeatRequest(node_id="n"), pb.HeartbeatRequest(node_id="n")
    a.peers.add(peer="p", accepted=1)
    a.peers.add()
    b.peers.add(peer="p")
    b.peers.add(accepted=1)
    assert canonical_bytes(a) != canonical_bytes(b)


def test_negative_zero_is_not_zero():
    assert canonical_bytes(pb.StepReport(loss=-0.0)) != canonical_bytes(pb.StepReport(loss=0.0))
