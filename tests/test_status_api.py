"""The status API as other programs use it, against a real coordinator process.

`tests/status_client.py` is a client that has nothing of pipeguard but the generated code: it runs
in a fresh interpreter (``python -I``) over a sandbox holding only a copy of pipeguard/v1/*_pb2*.py,
and checks what the proto promises: reflection lists and describes the service, health answers,
Status carries the key in both documented encodings and the node id derives from it, "no step /
no node" is presence, and Watch resumes by ``after_seq``, including after the explicit
RESOURCE_EXHAUSTED a watcher that falls behind gets. Then `pipeguard status --json`: numbers,
not strings, and no torch loaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeguard.app.testnet import LocalTestnet
from tests.conftest import tiny_run

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
CLIENT = Path(__file__).resolve().parent / "status_client.py"


@pytest.fixture
def coordinator(testnet) -> LocalTestnet:
    """A coordinator with no nodes: it waits to form its pipeline and serves its status."""
    net = testnet(tiny_run({"pipeline.stages": 2, "data.max_bytes": 65536}))
    net.start_coordinator()
    return net


def generated_code_only(tmp: Path) -> Path:
    """A folder holding the generated code and nothing else of pipeguard."""
    sandbox = tmp / "sandbox"
    (sandbox / "pipeguard" / "v1").mkdir(parents=True)
    (sandbox / "pipeguard" / "__init__.py").write_text("")
    (sandbox / "pipeguard" / "v1" / "__init__.py").write_text("")
    generated = sorted((ROOT / "pipeguard" / "v1").glob("*_pb2*.py"))
    assert {p.name for p in generated} == {"pipeguard_pb2.py", "pipeguard_pb2_grpc.py"}
    for path in generated:
        shutil.copy(path, sandbox / "pipeguard" / "v1" / path.name)
    return sandbox


def test_a_client_built_from_the_generated_code_alone_uses_the_whole_status_api(coordinator, tmp_path):
    c = coordinator.coordinator
    out = subprocess.run([sys.executable, "-I", str(CLIENT), str(generated_code_only(tmp_path)), c.address,
                          str(coordinator.admin_token_file), c.node_id],
                         capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr + "\ncoordinator log:\n" + c.log_tail()
    seen = json.loads(out.stdout.splitlines()[-1])
    assert "pipeguard.v1.Coordinator" in seen["services"]
    assert seen["cut_after"] > 1000 and seen["resumed"] > 0


def test_status_json_prints_numbers_and_loads_no_torch(coordinator):
    code = ("import sys\nfrom pipeguard.app.cli import main\n"
            f"rc = main(['status', '--coordinator', {coordinator.coordinator.address!r}, '--json'])\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\nsys.exit(rc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "no torch", out.stderr
    status = json.loads(out.stdout)
    assert status["step"] == 0 and status["total_steps"] == 4 and status["audits_total"] == 0, status
    assert all(isinstance(e["seq"], int) for e in status["events"])
    started = next(e for e in status["events"] if e["kind"] == "coordinator_started")
    assert started["step"] == 0 and started["type"] == "EVENT_KIND_COORDINATOR_STARTED"
    assert "loss" not in started, "an absent optional field is left out"
    assert status["coordinator_key_hex"] == coordinator.coordinator.info["public_key"]
