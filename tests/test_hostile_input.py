"""Hostile input, property-based: every decoder and every RPC handler of both daemons.

Pure decoders (evidence bundles, tensor streams, state streams, signatures, config) take
hypothesis-generated input directly; the RPC handlers get it through the real gRPC servers of
``tests/hostile.py`` (a coordinator and a middle-stage node on loopback, real signatures), where
every case is checked for its precise status, unchanged run state, a server that still serves
and bounded memory. Examples per test are few (CI adds well under a minute); ``benchmarks/fuzz.py``
runs the same cases by the thousand. Settings are derandomized and database-less, so CI is
deterministic.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import stat
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeguard.config import ConfigError, load
from pipeguard.errors import _BY_CODE, PipeguardError, Unauthenticated
from pipeguard.evidence import MAX_MANIFEST_BYTES, BundleError, _Reader, verify_bundle, write_equivocation_bundle
from pipeguard.identity import Identity
from pipeguard.signing import canonical_bytes, sign, verify
from pipeguard.tensors import TORCH_DTYPES, StateAssembler, TensorSender, make_header, receive_tensor, tensor_bytes
from pipeguard.v1 import pipeguard_pb2 as pb
from tests import hostile

MAPPED = set(_BY_CODE) - {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
"""Statuses of pipeguard's typed errors; a decoder may raise any of them, never anything else."""

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(300)]

FEW = settings(max_examples=25, deadline=None, derandomize=True, database=None,
               suppress_health_check=list(HealthCheck))
"""The CI profile: a fixed, small sample (the fuzzer, benchmarks/fuzz.py, runs many more)."""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


# -- evidence bundles ---------------------------------------------------------------------------


SIGNER = Identity.generate()


def _equivocation(path: Path) -> Path:
    header = pb.TensorHeader(run_id="r", step=3, micro_batch=1, stage=0, direction=pb.DIRECTION_FORWARD,
                             sender=SIGNER.node_id, receiver="n", dtype=pb.DTYPE_FLOAT32, shape=[2, 2])
    first = sign(pb.TensorCommitment(header=header, payload_digest=b"\x01" * 32), SIGNER)
    second = sign(pb.TensorCommitment(header=header, payload_digest=b"\x02" * 32), SIGNER)
    return write_equivocation_bundle(path, first, second, SIGNER.public_key)


def _rewrite(path: Path, manifest, members: dict[str, bytes] | None = None,
             compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr("manifest.json", manifest if isinstance(manifest, (bytes, str)) else json.dumps(manifest))
        for name, data in (members or {}).items():
            zf.writestr(name, data)
    return path


@FEW
@given(data=st.data())
def test_a_mangled_bundle_is_reported_invalid_never_raised(tmp_path_factory, data):
    path = _equivocation(tmp_path_factory.mktemp("bundle") / "e.pgev")
    assert verify_bundle(path).valid, "the untouched bundle proves the equivocation"
    manifest = json.loads(zipfile.ZipFile(path).read("manifest.json"))
    mangled = copy.deepcopy(manifest)
    where = data.draw(st.sampled_from(["kind", "signer_key", "format", "claims", "claims.first", "claims.first.b64",
                                       "claims.first.type", "tensors", "root"]))
    value = data.draw(json_values)
    if where == "root":
        mangled = value
    else:
        *parents, leaf = where.split(".")
        node = mangled
        for key in parents:
            node = node[key]
        node[leaf] = value
    _rewrite(path, mangled)
    result = verify_bundle(path)
    if mangled != manifest and where != "tensors":  # an equivocation bundle holds no tensors
        assert not result.valid, f"{where} = {value!r} still verifies"


@pytest.mark.parametrize("case", ["not json", "a list", "deeply nested", "zip bomb manifest", "not a zip",
                                  "claims a list"])
def test_malformed_bundles_are_refused_in_bounded_memory(tmp_path, case):
    path = tmp_path / "b.pgev"
    if case == "not json":
        _rewrite(path, b"\xff{")
    elif case == "a list":
        _rewrite(path, [1, 2])
    elif case == "deeply nested":
        _rewrite(path, "[" * 100_000 + "]" * 100_000)
    elif case == "zip bomb manifest":  # ~300 KiB on disk, 300 MiB inflated
        _rewrite(path, b" " * (MAX_MANIFEST_BYTES + (236 << 20)), compression=zipfile.ZIP_DEFLATED)
    elif case == "not a zip":
        path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    else:
        _rewrite(path, {"format": "pipeguard-evidence/1", "kind": "equivocation", "claims": [], "signer_key": "00"})
    tracemalloc.start()
    try:
        result = verify_bundle(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not result.valid and result.summary
    assert peak < 16 * 1024 * 1024, f"{peak} bytes allocated refusing {case}"


@pytest.mark.parametrize("entry, members, fragment", [
    ({"dtype": 1, "shape": [4], "file": "t"}, {"t": b"\x00" * (64 << 20)}, "its shape needs 16"),  # inflates
    ({"dtype": 1, "shape": [2**70], "file": "t"}, {"t": b""}, "dimension over"),
    ({"dtype": 1, "shape": [2**40, 2**40], "file": "t"}, {"t": b""}, "its shape needs"),
    ({"dtype": 99, "shape": [1], "file": "t"}, {"t": b"\x00" * 4}, "dtype"),
    ({"dtype": 1, "shape": "4", "file": "t"}, {"t": b"\x00" * 16}, "list of integers"),
    ({"dtype": 1, "shape": [1], "file": "../../etc/passwd"}, {}, "unreadable"),
    ({"dtype": 1, "shape": [1] * 9, "file": "t"}, {"t": b"\x00" * 4}, "dimensions"),
], ids=["zip bomb", "dim past int64", "shape far larger than the file", "unknown dtype", "shape not a list",
        "path outside the bundle", "too many dims"])
def test_bundle_tensors_are_checked_against_their_shape_before_reading(tmp_path, entry, members, fragment):
    path = _rewrite(tmp_path / "t.pgev", {"format": "pipeguard-evidence/1", "claims": {}, "tensors": {"x": entry}},
                    members, compression=zipfile.ZIP_DEFLATED)
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=fragment):
            _Reader(path).tensor("x")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024


# -- tensor and state streams -------------------------------------------------------------------


SENDER = Identity.generate()
STREAM_LIMIT = 1 << 20

u64 = st.integers(0, 2**64 - 1)
headers = st.builds(
    pb.TensorHeader, run_id=st.text(max_size=8), step=u64, micro_batch=st.integers(0, 2**32 - 1),
    stage=st.integers(0, 2**32 - 1), direction=st.integers(-2**31, 2**31 - 1), sender=st.text(max_size=8),
    receiver=st.text(max_size=8), dtype=st.integers(-2**31, 2**31 - 1),
    shape=st.lists(st.one_of(st.integers(0, 64), u64), max_size=10), epoch=u64)
chunks = st.builds(pb.TensorChunk, data=st.binary(max_size=2048), payload_digest=st.binary(max_size=40),
                   signature=st.binary(max_size=70))


async def _aiter(items):
    for item in items:
        yield item


def _receive(stream):
    return asyncio.run(receive_tensor(_aiter(stream), max_tensor_bytes=STREAM_LIMIT,
                                      admit=lambda header: SENDER.public()))


@FEW
@given(header=st.one_of(st.none(), headers), rest=st.lists(chunks, max_size=6), header_again=st.booleans())
def test_any_tensor_stream_is_refused_with_a_typed_error_in_bounded_memory(header, rest, header_again):
    """Headers with any enum value, any shape (past the limit, past int64, >8 dims), chunks in any
    order: the receiver raises one of the mapped errors and never holds more than its limit."""
    stream = ([pb.TensorChunk(header=header)] if header is not None else []) + rest
    if header_again and header is not None and rest:
        stream.append(pb.TensorChunk(header=header))
    base = hostile.reset_peak_rss()
    with pytest.raises(PipeguardError) as err:  # no signature by SENDER: nothing can be accepted
        _receive(stream)
    assert err.value.code in MAPPED, err.value
    assert hostile.peak_rss() - base < 4 * STREAM_LIMIT + (16 << 20)


@FEW
@given(dtype=st.sampled_from(sorted(TORCH_DTYPES)), shape=st.lists(st.integers(0, 5), max_size=4),
       chunk_bytes=st.integers(1, 64), specials=st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), max_size=3))
def test_any_valid_tensor_travels_bit_exact_including_nan_and_inf(dtype, shape, chunk_bytes, specials):
    t = torch.randn(shape).to(TORCH_DTYPES[dtype]) if dtype != pb.DTYPE_INT64 else torch.randint(-9, 9, shape)
    if t.is_floating_point() and t.numel():
        for i, v in enumerate(specials):
            t.view(-1)[i % t.numel()] = v
    header = make_header(run_id="r", step=1, micro_batch=0, stage=0, direction=pb.DIRECTION_FORWARD,
                         sender=SENDER.node_id, receiver="x", tensor=t)
    rt = _receive(list(TensorSender(header, t, SENDER, chunk_bytes).chunks()))
    assert rt.tensor.dtype == t.dtype and list(rt.tensor.shape) == shape
    assert bytes(tensor_bytes(rt.tensor)) == bytes(tensor_bytes(t))


state_chunks_ = st.builds(pb.StateChunk, name=st.one_of(st.just(""), st.text(max_size=6)),
                          dtype=st.integers(-2, 6), shape=st.lists(st.one_of(st.integers(0, 8), u64), max_size=10),
                          data=st.binary(max_size=300), stage=st.integers(0, 3))


@FEW
@given(stream=st.lists(state_chunks_, max_size=8))
def test_any_state_stream_assembles_or_is_refused_with_a_typed_error(stream):
    asm = StateAssembler(max_tensor_bytes=4096)
    try:
        for chunk in stream:
            asm.add(chunk)
        tensors = asm.finish()
    except PipeguardError as exc:
        assert exc.code in MAPPED, exc
        return
    for name, t in tensors.items():  # what it did assemble is exactly what the stream declared
        assert name and t.numel() * t.element_size() <= 4096


# -- signatures ---------------------------------------------------------------------------------


heartbeats = st.builds(pb.HeartbeatRequest, node_id=st.text(max_size=40), seq=u64, tensors_sent=u64,
                       tensors_received=u64, tensors_rejected=u64,
                       peers=st.lists(st.builds(pb.PeerCounters, peer=st.text(max_size=8), accepted=u64,
                                                rejected=u64, last_reason=st.text(max_size=8)), max_size=3))
signed_messages = st.one_of(heartbeats, headers.map(lambda h: pb.TensorCommitment(header=h, payload_digest=b"d" * 32)))


@FEW
@given(msg=signed_messages, data=st.data())
def test_a_signature_covers_every_field_and_nothing_forges_it(msg, data):
    sign(msg, SENDER)
    verify(msg, SENDER.public())
    parsed = type(msg).FromString(msg.SerializeToString() + b"\xa8\x1f\x01")  # plus an unknown field 501
    assert canonical_bytes(parsed) == canonical_bytes(msg), "canonical bytes survive the wire"
    verify(parsed, SENDER.public())

    forged = type(msg)()
    forged.CopyFrom(msg)
    forged.signature = data.draw(st.binary(max_size=80).filter(lambda s: s != msg.signature), label="signature")
    with pytest.raises(Unauthenticated):
        verify(forged, SENDER.public())
    with pytest.raises(Unauthenticated):  # signed by someone else
        verify(msg, Identity.generate().public())

    changed = type(msg)()
    changed.CopyFrom(msg)
    if isinstance(msg, pb.HeartbeatRequest):
        changed.seq = (msg.seq + data.draw(st.integers(1, 2**32), label="seq delta")) % 2**64
    else:
        changed.header.step = (msg.header.step + 1) % 2**64
    with pytest.raises(Unauthenticated):
        verify(changed, SENDER.public())


# -- config loaders -----------------------------------------------------------------------------


@FEW
@given(text=st.one_of(st.text(max_size=200), st.dictionaries(
    st.sampled_from(["run_id", "model", "train", "pipeline", "net", "timeouts", "registry", "audit", "zzz"]),
    st.one_of(json_values, st.dictionaries(st.sampled_from(["steps", "stages", "bind", "rate", "max_nodes",
                                                             "heartbeat_timeout", "preset", "chunk_bytes", "x"]),
                                           json_values, max_size=3)), max_size=4)))
def test_any_config_file_loads_or_says_what_is_wrong(tmp_path_factory, text):
    from coordinator.config import CoordinatorConfig  # noqa: PLC0415
    from node.config import NodeConfig  # noqa: PLC0415

    if isinstance(text, dict):
        text = "\n".join(_toml_lines(text))
    path = tmp_path_factory.mktemp("cfg") / "run.toml"
    path.write_text(text)
    for cls in (CoordinatorConfig, NodeConfig):
        try:
            load(cls, path=path, environ={})
        except ConfigError as exc:
            assert str(exc)


def _toml_lines(tree: dict):
    scalars = {k: v for k, v in tree.items() if not isinstance(v, dict)}
    for k, v in scalars.items():
        yield f"{k} = {json.dumps(v)}" if v is not None and not isinstance(v, dict) else f"{k} = \"\""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield f"[{k}]"
            for kk, vv in v.items():
                yield f"{kk} = {json.dumps(vv)}" if vv is not None and not isinstance(vv, dict) else f"{kk} = 1"


# -- every RPC of both daemons, through their real gRPC servers ---------------------------------


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    made: dict[str, hostile.Harness] = {}

    def get(name: str) -> hostile.Harness:
        if name not in made:
            cls, _ = hostile.TARGETS[name]
            made[name] = hostile.Harness(cls, tmp_path_factory.mktemp(name))
        return made[name]

    yield get
    for harness in made.values():
        harness.close()


RPC_CASES = settings(FEW, max_examples=2)


def _check(harness: hostile.Harness, case: hostile.Case) -> None:
    result = harness.run_case(case)
    assert not result.failures, f"{case!r}: {result.failures}"


@pytest.mark.parametrize("fault", list(hostile.CFault), ids=lambda f: f.name.lower())
def test_every_hostile_coordinator_call_gets_its_status_and_changes_nothing(targets, fault):
    harness = targets("coordinator")

    @RPC_CASES
    @given(case=hostile.coordinator_cases()[fault])
    def check(case):
        _check(harness, case)

    check()


@pytest.mark.parametrize("fault", list(hostile.NFault), ids=lambda f: f.name.lower())
def test_every_hostile_node_call_gets_its_status_and_changes_nothing(targets, fault):
    harness = targets("node")

    @RPC_CASES
    @given(case=hostile.node_cases()[fault])
    def check(case):
        _check(harness, case)

    check()


def test_every_fault_has_a_precise_status():
    for table in (hostile.C_EXPECTED, hostile.N_EXPECTED):
        assert not {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL} & set(table.values())
    assert set(hostile.C_EXPECTED) == set(hostile.CFault) == set(hostile.coordinator_cases())
    assert set(hostile.N_EXPECTED) == set(hostile.NFault) == set(hostile.node_cases())


# -- identity hygiene -----------------------------------------------------------------------------


@pytest.mark.parametrize("daemon, mode", [("pipeguard-node", 0o640), ("pipeguard-coordinator", 0o604)])
def test_a_daemon_refuses_a_key_file_readable_by_group_or_others(tmp_path, daemon, mode):
    """Both real entry points, started on a key file anyone else may read: exit 1, the chmod hint,
    and the file left as it was (never silently replaced by a fresh identity). Every other mode is
    covered by tests/test_identity.py; that a node cannot register under another's key, and that a
    live id cannot register twice, by REGISTER_UNDER_ANOTHER_KEY and REGISTER_LIVE_ID above."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    key = home / ("node.key" if daemon == "pipeguard-node" else "coordinator.key")
    seed = Identity.generate().private_bytes_hex() + "\n"
    key.write_text(seed)
    os.chmod(key, mode)
    args = (["--home", str(home), "--coordinator", "127.0.0.1:9"] if daemon == "pipeguard-node"
            else ["--state-dir", str(home), "--stages", "1"])
    exe = Path(sys.executable).with_name(daemon)
    proc = subprocess.run([str(exe), *args, "--bind", "127.0.0.1:0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert f"chmod 600 {key}" in proc.stderr
    assert key.read_text() == seed and stat.S_IMODE(key.stat().st_mode) == mode
