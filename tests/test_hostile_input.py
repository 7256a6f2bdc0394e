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

import copy
import json
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeguard.evidence import MAX_MANIFEST_BYTES, BundleError, _Reader, verify_bundle, write_equivocation_bundle
from pipeguard.identity import Identity
from pipeguard.signing import sign
from pipeguard.v1 import pipeguard_pb2 as pb

pytestmark = pytest.mark.timeout(300)

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
