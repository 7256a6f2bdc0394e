"""The coordinator's run store and event log on disk: permissions, event numbering across restarts."""

from __future__ import annotations

import logging
import stat

import pytest

from coordinator import state as state_mod
from coordinator.state import EventLog, RunStore

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_directory_is_created_private(tmp_path):
    store = RunStore(tmp_path / "deep" / "state")
    assert _mode(store.dir) == 0o700


def test_a_looser_existing_state_directory_is_tightened_and_logged(tmp_path, caplog):
    d = tmp_path / "state"
    d.mkdir()
    d.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="coordinator.state"):
        RunStore(d)
    assert _mode(d) == 0o700
    assert any(str(d) in r.getMessage() and "755" in r.getMessage() for r in caplog.records)


def test_event_seq_keeps_increasing_across_a_restart(tmp_path):
    events = EventLog(RunStore(tmp_path))
    events.emit("node_registered", "node a registered")
    events.emit("step", "step 0 loss 5.5", step=0, persist=False)  # per-step events, as the clock emits them
    events.emit("step", "step 1 loss 5.4", step=1, persist=False)

    restarted = EventLog(RunStore(tmp_path))
    assert [e.seq for e in restarted.recent] == [1, 2, 3]
    assert restarted.emit("coordinator_started", "restarted").seq == 4


def test_a_long_event_log_is_compacted_at_start_without_reusing_seq(tmp_path, monkeypatch):
    monkeypatch.setattr(state_mod, "EVENTS_KEPT", 5)
    monkeypatch.setattr(state_mod, "EVENTS_COMPACT_AT", 10)
    store = RunStore(tmp_path)
    events = EventLog(store)
    for i in range(12):
        events.emit("step", f"step {i}", step=i)
    restarted = EventLog(RunStore(tmp_path))
    assert [e.seq for e in restarted.recent] == [8, 9, 10, 11, 12]
    assert len(store.events_path.read_text().splitlines()) == 5
    assert restarted.emit("coordinator_started", "restarted").seq == 13


def test_a_state_directory_holding_a_run_needs_resume_and_resume_needs_a_run(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(state_mod.StateError, match="nothing to resume.*start without --resume"):
        store.load_or_create("", resume=True)
    assert not store.state_path.exists(), "a refused resume leaves nothing behind"
    st, resumed = store.load_or_create("")
    assert not resumed
    st.step, st.audit_rate = 12, 0.3
    store.save(st)
    with pytest.raises(state_mod.StateError, match=f"holds run '{st.run_id}' \\(waiting, at step 12\\); pass --resume "
                                                   "to continue it, or pick another --state-dir"):
        store.load_or_create("")
    again, resumed = store.load_or_create("", resume=True)
    assert resumed and (again.run_id, again.step, again.audit_rate) == (st.run_id, 12, 0.3)


def _tiny_state(step: int):
    import torch

    from pipeguard.tensors import state_digest

    named = {"param/w": torch.full((2,), float(step))}
    return {0: (named, state_digest(iter(named.items())))}


def test_checkpoints_keep_the_one_a_late_conviction_rolls_back_to(tmp_path):
    from coordinator.checkpoints import CheckpointStore

    store = CheckpointStore(tmp_path / "checkpoints", keep=3)
    retention = 4
    for step in range(8):  # checkpoint_every = 1: more checkpoints than keep within the retention window
        store.save(step, _tiny_state(step), needed_from=step - retention)
    # Audits of step 3 may still convict (they finish before step 3 + retention applies): step 3
    # and everything after it stay, although keep is 3.
    assert store.steps() == [3, 4, 5, 6, 7]
    assert store.load(3, 0)["param/w"].tolist() == [3.0, 3.0]
    store.save(8, _tiny_state(8))  # without needed_from: just the newest keep
    assert store.steps() == [6, 7, 8]
