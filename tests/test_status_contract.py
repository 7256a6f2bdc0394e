"""The proto's promises about the status API, kept equal to the code that keeps them.

EventKind is the one list of event kinds: every kind the coordinator emits is a value of it and
every value is emitted somewhere; the numbers the proto's comments quote (history default,
events kept, watcher backlog) are the code's constants; events keep "no step" apart from step 0
through a restart; ``status --json`` prints 64-bit integers as numbers; ``pipeguard status`` loads
no torch.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator import service
from coordinator.state import EVENT_FIELDS, EventLog, RunStore, event_kinds, event_type
from pipeguard.app.status import to_json
from pipeguard.v1 import pipeguard_pb2 as pb

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PROTO = (ROOT / "protos" / "pipeguard" / "v1" / "pipeguard.proto").read_text()


def emitted_kinds() -> dict[str, list[str]]:
    """kind -> files under coordinator/ that emit it (``.emit("kind", ...)``)."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "coordinator").rglob("*.py")):
        for kind in re.findall(r"\.emit\(\s*\"([a-z_]+)\"", path.read_text()):
            found.setdefault(kind, []).append(path.name)
    return found


def test_every_kind_the_coordinator_emits_is_an_event_kind_and_every_event_kind_is_emitted():
    emitted = emitted_kinds()
    assert len(emitted) >= 24, f"the walker finds too few kinds: {sorted(emitted)}"
    emits = sum(len(re.findall(r"\.emit\(", p.read_text())) for p in (ROOT / "coordinator").rglob("*.py"))
    assert emits == sum(len(v) for v in emitted.values()), \
        "an emit() call whose kind is not a string literal: the walker cannot check it"
    assert set(emitted) - set(event_kinds()) == set(), "add these kinds to EventKind in pipeguard.proto"
    assert set(event_kinds()) - set(emitted) == set(), "EventKind lists kinds nothing emits"


def test_event_kind_names_spell_event_kind_strings():
    for kind in event_kinds():
        assert pb.EventKind.Name(event_type(kind)) == "EVENT_KIND_" + kind.upper()
    assert event_type("step_done") == pb.EVENT_KIND_UNSPECIFIED
    assert "step_done" not in PROTO, "the proto names a kind that does not exist"


def test_the_numbers_the_proto_quotes_are_the_codes():
    text = re.sub(r"\s*\n\s*//\s*", " ", PROTO)  # comments as running text
    quoted = re.findall(r"(\d+)[^()\d]{0,40}\(coordinator\.(\w+)\.([A-Z_]+)\)", text)
    assert {name for _, _, name in quoted} >= {"DEFAULT_HISTORY", "EVENTS_KEPT", "WATCH_BACKLOG"}, quoted
    for number, module, name in quoted:
        assert getattr(importlib.import_module(f"coordinator.{module}"), name) == int(number), (module, name)
    assert f"`{service.RESUME_TRAILER}: N`" in PROTO


def test_emit_refuses_a_kind_or_a_figure_the_schema_lacks(tmp_path):
    events = EventLog(RunStore(tmp_path))
    with pytest.raises(ValueError, match="EventKind"):
        events.emit("step_done", "a kind nobody documented")
    with pytest.raises(ValueError, match="no field"):
        events.emit("step", "a figure nobody documented", step=1, perplexity=3.0)
    assert events.seq == 0, "a refused event takes no number"


def test_no_step_and_step_zero_stay_apart_across_a_restart(tmp_path):
    events = EventLog(RunStore(tmp_path))
    events.emit("node_registered", "no step", node_id="ab" * 16)
    events.emit("training", "step 0", step=0)
    events.emit("step", "figures", step=0, loss=5.5, tokens_per_s=1000.0, grad_norm=0.5, lr=1e-3)
    again = EventLog(RunStore(tmp_path)).recent
    assert [e.HasField("step") for e in again] == [False, True, True]
    assert [e.type for e in again] == [pb.EVENT_KIND_NODE_REGISTERED, pb.EVENT_KIND_TRAINING, pb.EVENT_KIND_STEP]
    step = again[-1]
    assert (step.loss, step.tokens_per_s, step.grad_norm, step.lr) == (5.5, 1000.0, 0.5, 1e-3)
    assert not any(again[0].HasField(f) for f in EVENT_FIELDS)


def test_an_events_file_written_before_event_types_still_loads(tmp_path):
    store = RunStore(tmp_path)
    store.events_path.write_text(json.dumps({"seq": 7, "time": 1.0, "kind": "step", "message": "old", "node_id": "",
                                             "step": 3}) + "\n" + '{"seq": 8, "ti')  # the last line cut by a crash
    events = EventLog(store)
    assert [(e.seq, e.type, e.step) for e in events.recent] == [(7, pb.EVENT_KIND_STEP, 3)]
    assert events.emit("waiting", "next").seq == 8


def test_status_json_prints_64_bit_integers_as_numbers_and_leaves_absent_fields_out():
    reply = pb.StatusReply(step=3, total_steps=10, coordinator_key=b"\x01" * 32, coordinator_key_hex="01" * 32)
    reply.losses.add(step=2, loss=1.5, tokens_per_s=10.0)
    reply.events.add(seq=12, kind="node_registered", type=pb.EVENT_KIND_NODE_REGISTERED)
    reply.events.add(seq=13, kind="training", type=pb.EVENT_KIND_TRAINING, step=0)
    reply.nodes.add(node_id="n", role=pb.ROLE_STANDBY, tensors_sent=2**63)
    out = json.loads(json.dumps(to_json(reply)))
    assert (out["step"], out["total_steps"], out["audits_total"]) == (3, 10, 0)
    assert out["losses"][0]["step"] == 2 and [e["seq"] for e in out["events"]] == [12, 13]
    assert "step" not in out["events"][0] and out["events"][1]["step"] == 0, "absent is not 0"
    assert out["nodes"][0]["tensors_sent"] == 2**63 and "stage" not in out["nodes"][0]
    assert out["coordinator_key_hex"] == "01" * 32


def test_the_status_command_imports_no_torch():
    """Everything `pipeguard status` imports (cli.py and the imports of its _status_cmd), in a fresh
    interpreter: no torch. tests/test_status_api.py runs the command itself against a coordinator."""
    tree = ast.parse((ROOT / "pipeguard" / "app" / "cli.py").read_text())
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_status_cmd")
    names = ["pipeguard.app.cli"]  # `from a import b`: module a.b if there is one, else a
    for node in ast.walk(func):
        if isinstance(node, ast.ImportFrom):
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    assert "pipeguard.rpc.blocking_channel" in names and "pipeguard.app.status" in names, names
    code = (f"import importlib, sys\nfor name in {sorted(set(names))!r}:\n"
            "    try:\n        importlib.import_module(name)\n    except ModuleNotFoundError:\n"
            "        importlib.import_module(name.rsplit('.', 1)[0])\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "pipeguard status would load torch"
