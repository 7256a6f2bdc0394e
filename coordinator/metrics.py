"""The coordinator's Prometheus metrics, read from the run's live state at scrape time."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pipeguard.v1 import pipeguard_pb2 as pb
from coordinator.clock import StepClock
from coordinator.state import EventLog


def _name(enum, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()


class CoordinatorMetrics:
    """steps, loss, tokens/s, audits by result, bans, nodes by role, run phase, audit rate."""

    def __init__(self, clock: StepClock, events: EventLog):
        self.clock = clock
        self.steps = 0
        self.bans = {"audit": 0, "manual": 0}
        events.listeners.append(self._on_event)

    def _on_event(self, ev: pb.Event) -> None:
        if ev.kind == "step":
            self.steps += 1
        elif ev.kind == "banned":
            rec = self.clock.registry.nodes.get(ev.node_id)
            self.bans["manual" if rec is not None and rec.ban_reason.startswith("manual:") else "audit"] += 1

    def collect(self):
        clock = self.clock
        st = clock.state
        yield CounterMetricFamily("pipeguard_steps", "Training steps completed by this coordinator process "
                                  "(a step run again after a rollback counts again).", value=self.steps)
        yield GaugeMetricFamily("pipeguard_step", "Next step of the run (steps in its history).", value=st.step)
        yield GaugeMetricFamily("pipeguard_total_steps", "Configured steps of the run.", value=clock.cfg.train.steps)
        if st.losses:
            _, loss, tps = st.losses[-1]
            yield GaugeMetricFamily("pipeguard_loss", "Training loss of the last step.", value=loss)
            yield GaugeMetricFamily("pipeguard_tokens_per_second", "Tokens per second of the last step.", value=tps)
        phase = GaugeMetricFamily("pipeguard_run_phase", "1 for the run's current phase.", labels=["phase"])
        for value in pb.RunPhase.values():
            if value != pb.RUN_PHASE_UNSPECIFIED:
                phase.add_metric([_name(pb.RunPhase, value, "RUN_PHASE_")], 1.0 if st.phase == value else 0.0)
        yield phase
        nodes = GaugeMetricFamily("pipeguard_nodes", "Registered nodes by role.", labels=["role"])
        roles = [r.role for r in list(clock.registry.nodes.values())]
        for value in pb.Role.values():
            if value != pb.ROLE_UNSPECIFIED:
                nodes.add_metric([_name(pb.Role, value, "ROLE_")], roles.count(value))
        yield nodes
        bans = CounterMetricFamily("pipeguard_bans", "Nodes banned by this coordinator process, by cause "
                                   "(a confirmed audit, or an operator).", labels=["cause"])
        for cause, n in self.bans.items():
            bans.add_metric([cause], n)
        yield bans
        yield GaugeMetricFamily("pipeguard_audit_rate", "Audit probability per message and per update in force.",
                                value=clock.cfg.audit.rate)
        a = clock.audits.stats if clock.audits is not None else None
        if a is not None:
            yield CounterMetricFamily("pipeguard_audits_dispatched", "Audits ordered.", value=a.dispatched)
            audits = CounterMetricFamily("pipeguard_audits", "Audits finished, by result (failed = confirmed by "
                                         "the coordinator's recomputation).", labels=["result"])
            audits.add_metric(["passed"], sum(a.passed.values()))
            audits.add_metric(["failed"], sum(a.failed.values()))
            audits.add_metric(["incomplete"], a.incomplete)
            yield audits
