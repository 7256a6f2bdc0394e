"""An ExportState client that never reads must not stop the run (issue 11, liveness).

``ExportState`` is unauthenticated: anyone who reaches the coordinator may call it. The
coordinator used to stream the stages' states while holding the step lock, so a client that
opened the stream and stopped reading stopped every step. Now the states are fetched and checked
against their holders' signed commitments under the lock and streamed after it, one export at a
time, and a client that reads nothing for ``timeouts.request`` is dropped.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from pipeguard.app.testnet import LocalTestnet, wait_for
from pipeguard.v1 import pipeguard_pb2 as pb
from pipeguard.v1 import pipeguard_pb2_grpc as pb_grpc
from tests.conftest import tiny_run

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(180)]

STEPS = 8


def test_an_export_client_that_never_reads_stalls_no_step(tmp_path):
    # n_embd 64 with the optimizer state: ~1.5 MB per stage, far more than the client's
    # HTTP/2 window (64 KiB, BDP probing off), so the coordinator's writes block.
    run = tiny_run({"pipeline.stages": 2, "pipeline.min_nodes": 2, "model.n_layer": 2, "model.n_embd": 64,
                    "train.steps": STEPS, "train.micro_batches": 2, "audit.rate": 0.0, "audit.screen": False,
                    "timeouts.request": 15.0})
    with LocalTestnet(tmp_path / "net", run) as net:
        net.start_coordinator()
        for _ in range(2):
            net.start_node()
        wait_for(lambda: net.status().step >= 1 or None, 90, "the first step")

        stalled = grpc.insecure_channel(net.coordinator.address, options=[("grpc.http2.bdp_probe", 0)])
        stream = pb_grpc.CoordinatorStub(stalled).ExportState(pb.ExportRequest(include_optimizer=True), timeout=60)
        first = next(stream)  # the export has started; from here on the client reads nothing
        assert first.name
        at = net.status().step
        # a second export while the first is served is refused, not queued
        with pytest.raises(grpc.RpcError) as second:
            net.export_state(include_optimizer=True, timeout=30)
        assert second.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        status = net.wait_finished(120)
        assert status.step == STEPS and status.step > at, "training went on while the client read nothing"
        stalled.close()

        # the slow client was dropped; a reading client gets the finished model
        def exported():
            try:
                return net.export_state()
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    return None
                raise
        named = wait_for(exported, 60, "the stalled export to be dropped")
        assert named and all(torch.isfinite(t).all() for t in named.values())
