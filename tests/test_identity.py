"""Ed25519 identities: key files on disk, node ids, verification."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from pipeguard.errors import InvalidArgument
from pipeguard.identity import Identity, KeyFileError, PublicIdentity, node_id_for

pytestmark = pytest.mark.unit


def test_key_is_created_with_0600_and_reused(tmp_path):
    path = tmp_path / "home" / "node.key"
    first = Identity.load_or_create(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0, "key directory must not be open to others"
    assert [p.name for p in path.parent.iterdir()] == ["node.key"], "no temporary file left behind"

    again = Identity.load_or_create(path)
    assert again.public_key == first.public_key
    assert again.node_id == first.node_id
    # the reloaded key really is the same private key: its signatures verify under the old public key
    assert first.public().verify(again.sign(b"restart"), b"restart")


def test_distinct_key_files_give_distinct_identities(tmp_path):
    a = Identity.load_or_create(tmp_path / "a.key")
    b = Identity.load_or_create(tmp_path / "b.key")
    assert a.node_id != b.node_id


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o620, 0o602])
def test_key_readable_by_others_is_refused_with_chmod_hint(tmp_path, mode):
    path = tmp_path / "node.key"
    Identity.load_or_create(path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as err:
        Identity.load_or_create(path)
    assert f"chmod 600 {path}" in str(err.value)
    assert f"{mode:o}" in str(err.value), "the message shows the offending mode"


def test_owner_only_modes_are_accepted(tmp_path):
    path = tmp_path / "node.key"
    ident = Identity.load_or_create(path)
    for mode in (0o400, 0o700):
        os.chmod(path, mode)
        assert Identity.load(path).node_id == ident.node_id


@pytest.mark.parametrize(
    "content, fragment",
    [("not hex at all\n", "not hex-encoded"), ("abcd\n", "32-byte Ed25519 seed"), ("", "32-byte Ed25519 seed")],
)
def test_corrupt_key_file_is_refused_with_reason(tmp_path, content, fragment):
    path = tmp_path / "node.key"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match=fragment):
        Identity.load(path)


def test_node_id_is_derived_from_public_key():
    ident = Identity.generate()
    assert ident.node_id == hashlib.sha256(ident.public_key).hexdigest()[:32]
    assert ident.node_id == node_id_for(ident.public_key) == PublicIdentity(ident.public_key).node_id
    assert len(ident.public_key) == 32


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_node_id_refuses_wrong_key_length(length):
    with pytest.raises(InvalidArgument, match="32 bytes"):
        node_id_for(b"\x01" * length)


def test_verify_accepts_own_signature_and_rejects_everything_else():
    alice, mallory = Identity.generate(), Identity.generate()
    msg = b"step 3 micro-batch 1"
    sig = alice.sign(msg)

    assert alice.public().verify(sig, msg)
    assert not mallory.public().verify(sig, msg), "wrong key"
    assert not alice.public().verify(sig, msg + b"!"), "tampered message"
    tampered = bytes([sig[0] ^ 1]) + sig[1:]
    assert not alice.public().verify(tampered, msg), "tampered signature"
    assert not alice.public().verify(sig[:-1], msg), "truncated signature"
    assert not alice.public().verify(b"", msg), "empty signature"
