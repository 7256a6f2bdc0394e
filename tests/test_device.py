"""The device setting, the compute dtype and audits across device classes (issue 13). Unit tier.

What runs on a CPU-only machine runs here: the setting's spelling and resolution (``auto`` is cpu
without a GPU; ``cuda`` without one is a clear config error at start), an explicit cpu device
computing bit for bit what the default does, bf16 autocast on CPU, and the tolerance a
recomputation on another device class applies (through ``pipeguard.audit.check``, the function
auditors, the judge and ``pipeguard verify`` run). The CUDA half skips with a reason where torch
sees no GPU; benchmarks/gpu_check.py is the end-to-end check on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from coordinator.config import AuditConfig, TrainConfig
from node.attacks import Params, Ride
from node.config import NodeConfig
from pipeguard import audit
from pipeguard import device as devices
from pipeguard.computation import Determinism, StageComputation, StageSetup, node_build, to_wire, train_spec
from pipeguard.config import ConfigError
from pipeguard.v1 import pipeguard_pb2 as pb
from tests.test_tolerance import (BACKWARD, FORWARD, MODEL, OPTIM, RIDER, STAGES, TOL, artifacts, claims,  # noqa: F401
                                  ctx, setup)

pytestmark = [pytest.mark.unit, pytest.mark.timeout(180)]

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device on this machine "
                                "(benchmarks/gpu_check.py covers GPUs)")
cpu_only = pytest.mark.skipif(CUDA, reason="checks the behaviour of a machine without a GPU")
CROSS = AuditConfig().cross_device_tolerance


# -- the setting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["cpu", "cuda", "cuda:0", "cuda:3", "auto", " CUDA:1 "])
def test_every_documented_spelling_is_accepted(spec):
    assert devices.check(spec) == spec.strip().lower()
    assert NodeConfig(device=spec).device == spec.strip().lower()


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:", "tpu", "", "mps:0"])
def test_a_bad_device_string_is_a_config_error_that_lists_the_choices(spec):
    with pytest.raises(ConfigError, match=r"device must be one of cpu, cuda, cuda:N .* or auto"):
        NodeConfig(device=spec)
    with pytest.raises(ConfigError, match=r"audit\.device must be one of"):
        AuditConfig(device=spec)


def test_defaults_nodes_auto_referees_cpu_fp32():
    assert NodeConfig().device == "auto" and not NodeConfig().tf32
    assert AuditConfig().device == "cpu", "the judge recomputes on the CPU unless told otherwise"
    assert TrainConfig().compute_dtype == "fp32"
    assert AuditConfig().cross_device_tolerance > AuditConfig().tolerance
    with pytest.raises(ConfigError, match="compute_dtype must be one of"):
        TrainConfig(compute_dtype="fp16")


@cpu_only
def test_auto_is_cpu_and_cuda_is_refused_with_the_fix_on_a_machine_without_a_gpu(tmp_path, capsys):
    assert devices.resolve("auto") == torch.device("cpu")
    assert devices.resolve("cpu") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=r"torch sees no CUDA device here .* set device = \"cpu\" or \"auto\""):
            devices.resolve(spec)
    from node.daemon import main

    assert main(["--device", "cuda", "--home", str(tmp_path)]) == 2, "the node refuses to start"
    assert "no CUDA device" in capsys.readouterr().err
    assert main(["--device", "gpu", "--home", str(tmp_path)]) == 2
    assert "device must be one of" in capsys.readouterr().err


@cpu_only
def test_the_judge_verify_and_testnet_refuse_cuda_without_a_gpu(tmp_path, monkeypatch, capsys):
    from coordinator.daemon import main as coordinator_main
    from pipeguard.app.cli import main as cli_main

    monkeypatch.setenv("PIPEGUARD_AUDIT_DEVICE", "cuda")
    assert coordinator_main(["--state-dir", str(tmp_path / "state")]) == 2
    assert "audit.device = 'cuda', but torch sees no CUDA device" in capsys.readouterr().err
    monkeypatch.delenv("PIPEGUARD_AUDIT_DEVICE")
    bundle = tmp_path / "x.pgev"
    bundle.write_bytes(b"")
    assert cli_main(["verify", str(bundle), "--device", "cuda:0"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert cli_main(["testnet", "--device", "cuda", "--workdir", str(tmp_path / "net")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "net").exists(), "nothing started"
    assert cli_main(["testnet", "--auditor-device", "cuda", "--workdir", str(tmp_path / "net")]) == 2


def test_device_class_and_build_name_the_hardware():
    assert devices.device_class(torch.device("cpu")) == "cpu"
    build = node_build(threads=1, device=torch.device("cpu"))
    assert (build.device, build.cuda_version, build.threads) == ("cpu", "", 1)
    assert node_build(threads=1) == build, "a class name or a torch.device give the same build"


def test_cublas_workspace_is_set_before_cuda_starts():
    import os

    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (devices.CUBLAS_WORKSPACE, ":16:8")
    d = Determinism.for_device(1, torch.device("cuda", 0))
    assert d.deterministic_algorithms and d.matmul_precision == "highest" and not d.cudnn_tf32
    assert Determinism.for_device(1, torch.device("cuda", 0), tf32=True).matmul_precision == "high"
    assert not Determinism.for_device(1, torch.device("cpu")).deterministic_algorithms


# -- computing on a named device ----------------------------------------------------------------------


def _pass(comp: StageComputation, step: int = 0):
    x = torch.randn(comp.setup.activation_shape, generator=torch.Generator().manual_seed(step))
    fwd = comp.forward(step, 0, x)
    _, grad = comp.backward(fwd, torch.ones_like(fwd.y))
    return to_wire(fwd.output), to_wire(grad)


def test_an_explicit_cpu_device_computes_bit_for_bit_what_the_default_does():
    with Determinism(1).scope():
        a = StageComputation.build(setup(1))
        b = StageComputation.build(setup(1), device=torch.device("cpu"))
        assert a.digest() == b.digest() == StageComputation.seeded_digest(setup(1))
        for (ya, ga), (yb, gb) in zip([_pass(a)], [_pass(b)]):
            assert torch.equal(ya, yb) and torch.equal(ga, gb)
        a.update(1.0, 1e-3)
        b.update(1.0, 1e-3)
        assert a.digest() == b.digest()
        # from a named state (the audits' path: built on the meta device, moved to the device)
        c = StageComputation.build(setup(1), a.snapshot(), device=torch.device("cpu"))
        assert c.digest() == a.digest()
        assert all(t.device.type == "cpu" for _, t in c.state())


def test_bf16_autocast_runs_on_cpu_sends_float32_and_is_reproducible():
    bf16 = StageSetup.from_specs(MODEL, train_spec(OPTIM, seed=5, micro_batches=2, micro_batch_size=4,
                                                   compute_dtype="bf16"), 1, STAGES)
    assert bf16.compute_dtype == "bf16"
    assert StageSetup.from_specs(MODEL, train_spec(OPTIM, seed=5, micro_batches=2, micro_batch_size=4),
                                 1, STAGES).compute_dtype == "fp32"
    assert train_spec(OPTIM, seed=5, micro_batches=2, micro_batch_size=4).compute_dtype == "", \
        "fp32 leaves the field unset: fp32 runs' signed specs are unchanged"
    with Determinism(1).scope():
        y1, g1 = _pass(StageComputation.build(bf16))
        y2, g2 = _pass(StageComputation.build(bf16))
        y32, _ = _pass(StageComputation.build(setup(1)))
    assert y1.dtype == g1.dtype == torch.float32, "the wire carries float32 whatever the compute dtype"
    assert torch.equal(y1, y2) and torch.equal(g1, g2), "bf16 is reproducible at equal threads"
    assert not torch.equal(y1, y32), "bf16 really computes in reduced precision"


# -- audits across device classes -------------------------------------------------------------------------


def test_tolerance_for_a_pair_of_device_classes():
    req = pb.AuditRequest(tolerance=TOL, cross_device_tolerance=CROSS, target_device="cuda:NVIDIA H200")
    assert audit.tolerance_for(req, "cuda:NVIDIA H200") == TOL, "same class: the run's tolerance"
    assert audit.tolerance_for(req, "cpu") == CROSS, "another class: the cross-device tolerance"
    assert audit.tolerance_for(req, None) == TOL, "class unknown: the order's tolerance"
    assert audit.loosest_tolerance(req) == CROSS
    exact = pb.AuditRequest(tolerance=0.0, cross_device_tolerance=CROSS, target_device="cuda:NVIDIA H200")
    assert audit.tolerance_for(exact, "cpu") == 0.0 and audit.loosest_tolerance(exact) == 0.0, "exact stays exact"
    unknown = pb.AuditRequest(tolerance=TOL, cross_device_tolerance=CROSS)
    assert audit.tolerance_for(unknown, "cpu") == TOL, "a target of unknown class gets no allowance"
    smaller = pb.AuditRequest(tolerance=TOL, cross_device_tolerance=TOL / 10, target_device="cpu")
    assert audit.tolerance_for(smaller, "cuda:X") == TOL, "never tighter than the run's tolerance"


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_an_auditor_of_another_class_applies_the_cross_device_tolerance(claims, direction):  # noqa: F811
    """A claim off by 5x the run's tolerance fails a same-class audit and passes a cross-class one
    (within the cross-device allowance); beyond that allowance it fails both."""
    _, recs = claims
    rec = recs[1]
    d = FORWARD if direction == "forward" else BACKWARD
    kind = pb.AUDIT_KIND_FORWARD if direction == "forward" else pb.AUDIT_KIND_BACKWARD
    honest = rec["stages"][RIDER]["outputs"][(d, 0)]
    cpu = torch.device("cpu")
    for share, same_class, other_class in ((5.0, pb.VERDICT_FAIL, pb.VERDICT_PASS),
                                           (1.2 * CROSS / TOL, pb.VERDICT_FAIL, pb.VERDICT_FAIL)):
        ridden = Ride(direction, Params(ride=share, seed=3)).tamper(ctx(1, 0, d), honest)
        art = artifacts(rec, RIDER, kind, outputs={(d, 0): ridden})
        art.request.cross_device_tolerance = CROSS
        art.request.target_device = "cpu"
        with Determinism(1).scope():
            assert audit.check(art, cpu, "cpu").verdict == same_class
            art.request.target_device = "cuda:NVIDIA H200"
            found = audit.check(art, cpu, "cpu")
        assert found.verdict == other_class, found.detail
        assert f"tolerance {CROSS:g}" in found.detail


def test_honest_claims_stay_bit_identical_on_the_same_class_at_equal_threads(claims):  # noqa: F811
    """Exactness does not regress: at 1 thread, as the claims were made, every audit kind of every
    stage recomputes them bit for bit on an explicit cpu device (deviation 0)."""
    from tests.test_tolerance import KINDS

    _, recs = claims
    with Determinism(1).scope():
        for rec in recs:
            for stage, kind in KINDS:
                art = artifacts(rec, stage, kind, tolerance=0.0)
                art.request.target_device = "cpu"
                finding = audit.check(art, torch.device("cpu"), "cpu")
                assert finding.verdict == pb.VERDICT_PASS and finding.deviation == 0.0, finding.detail


# -- CUDA (skipped without a GPU) ---------------------------------------------------------------------------


@needs_cuda
def test_cuda_holds_the_state_and_reproduces_itself_bit_for_bit():
    gpu = devices.resolve("cuda")
    assert devices.device_class(gpu).startswith("cuda:")
    with Determinism.for_device(1, gpu).scope():
        a = StageComputation.build(setup(1), device=gpu)
        b = StageComputation.build(setup(1), device=gpu)
        assert all(t.device.type == "cuda" for name, t in a.state() if not name.endswith("/step"))
        assert a.digest() == StageComputation.seeded_digest(setup(1)), "initial weights are drawn on the host"
        (ya, ga), (yb, gb) = _pass(a), _pass(b)
        assert ya.device.type == "cpu", "outputs reach the wire in host memory"
        assert torch.equal(ya, yb) and torch.equal(ga, gb), "the same GPU twice: bit-identical"


@needs_cuda
def test_cuda_against_cpu_stays_within_the_cross_device_tolerance(claims):  # noqa: F811
    from tests.test_tolerance import KINDS

    _, recs = claims
    gpu = devices.resolve("cuda")
    with Determinism.for_device(1, gpu).scope():
        for rec in recs:
            for stage, kind in KINDS:
                art = artifacts(rec, stage, kind)
                art.request.target_device, art.request.cross_device_tolerance = "cpu", CROSS
                finding = audit.check(art, gpu, devices.device_class(gpu))
                assert finding.verdict == pb.VERDICT_PASS, finding.detail
