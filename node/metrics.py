"""The node's Prometheus metrics, read from its live counters at scrape time."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from node.service import NodeService


class NodeMetrics:
    """Tensors sent/received/rejected by reason, bytes sent, audits performed, step compute time."""

    def __init__(self, service: NodeService):
        self.service = service

    def collect(self):
        service = self.service
        runtime, peers = service.runtime, service.runtime.peers
        yield CounterMetricFamily("pipeguard_node_tensors_sent", "Tensors sent to pipeline neighbours.",
                                  value=peers.sent)
        yield CounterMetricFamily("pipeguard_node_bytes_sent", "Tensor payload bytes sent to pipeline neighbours.",
                                  value=peers.sent_bytes)
        yield CounterMetricFamily("pipeguard_node_tensors_received", "Tensors received and accepted.",
                                  value=sum(s.accepted for s in list(service.peer_stats.values())))
        rejected = CounterMetricFamily("pipeguard_node_tensors_rejected", "Tensors refused, by reason (the gRPC "
                                       "status the sender got).", labels=["reason"])
        for reason, n in sorted(dict(service.rejected_by_reason).items()):
            rejected.add_metric([reason], n)
        yield rejected
        done = service.auditor.done if service.auditor is not None else 0
        yield CounterMetricFamily("pipeguard_node_audits_performed", "Audits of other nodes this node carried out.",
                                  value=done)
        yield CounterMetricFamily("pipeguard_node_audit_state_bytes_fetched", "Bytes of audited nodes' states this "
                                  "node fetched as auditor.",
                                  value=service.auditor.fetched_state_bytes if service.auditor is not None else 0)
        yield CounterMetricFamily("pipeguard_node_audit_replica_hits", "Audits this node started from a state it "
                                  "already held (its replica of a stage it follows, or a state another audit of the "
                                  "same stage-step fetched) instead of fetching it.",
                                  value=service.auditor.replicas.hits if service.auditor is not None else 0)
        yield SummaryMetricFamily("pipeguard_node_step_compute_seconds", "Compute seconds of a step's forward and "
                                  "backward on this stage.", count_value=runtime.steps_computed,
                                  sum_value=runtime.compute_seconds)
        a = runtime.assignment
        yield GaugeMetricFamily("pipeguard_node_stage", "Stage this node serves (-1: none).",
                                value=a.stage if a is not None else -1)
        yield GaugeMetricFamily("pipeguard_node_step", "Next step of the stage this node serves.",
                                value=runtime.completed_step + 1)
