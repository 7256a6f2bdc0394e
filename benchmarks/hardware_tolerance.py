"""Honest deviations across hardware: what an auditor on other hardware sees (issue 13).

    python benchmarks/hardware_tolerance.py [--json PATH] [--models tiny,small] [--quick]

A claimant trains a 3-stage pipeline through ``pipeguard.computation`` (as the nodes compute it)
on one party -- a device, a torch thread count, a compute dtype -- and records what each stage
commits to at a step (its state, received and sent tensors, the update order, its next state).
``pipeguard.audit.check``, the function auditors, the judge and ``pipeguard verify`` run, then
recomputes every forward, backward and update audit of every stage on another party. Pairs:

- cpu: 1 thread against 1 (exact mode's case), 2 and 4 threads, and 2 against 1; fp32 and bf16;
- the dtype replayed wrong (fp32 claims recomputed in bf16): why the dtype is in the signed spec;
- with a GPU (``torch.cuda.is_available()``): the same GPU twice, GPU claims on a CPU auditor
  and CPU claims on a GPU auditor, in fp32 and bf16.

Per pair and audit kind it reports the largest honest deviation: forward and backward at
tolerance 0 (the raw per-element deviation), update audits at the tolerance the pair applies
(``audit.tolerance`` within a device class, ``audit.cross_device_tolerance`` across classes:
the honest range widens with it) and raw. Then, for scale, what some attacks on stage 1 read at
the pair's tolerance (activations scaled by 1 + 1e-3 and 1 + 1e-2, the sign of 0.1% and 1% of the
elements flipped, the optimizer step scaled by 1.05 and 1.5) and the smallest one still caught.
Runs in one process (thread counts change with ``Determinism``). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeguard import device as devices  # noqa: E402
from pipeguard.audit import Artifacts, check  # noqa: E402
from pipeguard.computation import Determinism, StageComputation, StageSetup, model_spec, to_wire, train_spec  # noqa: E402
from pipeguard.data import Dataset, stdlib_corpus  # noqa: E402
from pipeguard.model import GPTConfig, OptimSettings, lr_at, preset  # noqa: E402
from pipeguard.tensors import ReceivedTensor  # noqa: E402
from pipeguard.v1 import pipeguard_pb2 as pb  # noqa: E402

STAGES, SEED, DATA_BYTES = 3, 1234, 262144
FORWARD, BACKWARD = pb.DIRECTION_FORWARD, pb.DIRECTION_BACKWARD
DIGEST, NEXT_DIGEST = b"\x01" * 32, b"\x02" * 32


@dataclass(frozen=True)
class Party:
    """Where and how a stage is computed."""

    device: str
    threads: int = 1

    @property
    def torch_device(self) -> torch.device:
        return devices.resolve(self.device)

    @property
    def cls(self) -> str:
        return devices.device_class(self.torch_device)

    def __str__(self) -> str:
        return f"{self.device}/{self.threads}t" if self.device == "cpu" else self.cls

    def determinism(self) -> Determinism:
        return Determinism.for_device(self.threads, self.torch_device)


@dataclass(frozen=True)
class Case:
    name: str
    gpt: GPTConfig
    micro_batches: int
    micro_batch_size: int
    step: int
    """The step whose claims are audited (the pipeline trains up to it first; > 0: AdamW has moments)."""


CASES = {
    "tiny": Case("tiny", preset("tiny"), 4, 8, 3),
    "small": Case("small", preset("small"), 2, 2, 2),
    "gpt2": Case("gpt2", preset("gpt2", block_size=256), 2, 1, 1),
}


def optim(case: Case) -> OptimSettings:
    return OptimSettings(lr=3e-3, warmup_steps=2, total_steps=case.step + 10)


def specs(case: Case, dtype: str) -> tuple[pb.ModelSpec, pb.TrainSpec]:
    return model_spec(case.gpt), train_spec(optim(case), seed=SEED, micro_batches=case.micro_batches,
                                            micro_batch_size=case.micro_batch_size, compute_dtype=dtype)


def host(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in named.items()}


def make_claims(case: Case, party: Party, dtype: str, dataset: Dataset) -> dict:
    """Train up to ``case.step`` on ``party`` and record that step's claims (host copies, as on the wire)."""
    model, train = specs(case, dtype)
    dev = party.torch_device
    with party.determinism().scope():
        comps = [StageComputation.build(StageSetup.from_specs(model, train, s, STAGES), device=dev)
                 for s in range(STAGES)]
        for step in range(case.step + 1):
            record = step == case.step
            rec = {"step": step, "stages": [dict(inputs={}, grads_in={}, outputs={}) for _ in range(STAGES)]}
            if record:
                for s, c in enumerate(comps):
                    rec["stages"][s]["state"] = host(c.snapshot())
            for mb in range(case.micro_batches):
                tokens, targets = comps[0].setup.batch(dataset, step, mb)
                fwds, x = [], tokens
                for s, c in enumerate(comps):
                    fwds.append(c.forward(step, mb, x))
                    if s < STAGES - 1:
                        x = to_wire(fwds[-1].output)  # (B, T, C) on the host, as sent
                        rec["stages"][s]["outputs"][(FORWARD, mb)] = x
                        rec["stages"][s + 1]["inputs"][mb] = x
                g = targets
                for s in range(STAGES - 1, -1, -1):
                    _, g = comps[s].backward(fwds[s], g)
                    if s > 0:
                        g = to_wire(g)  # (B, T, C)
                        rec["stages"][s]["outputs"][(BACKWARD, mb)] = g
                        rec["stages"][s - 1]["grads_in"][mb] = g
            sq = [c.grad_sq_norm() for c in comps]
            norm, lr = math.sqrt(sum(sq)), lr_at(step, optim(case))
            for c in comps:
                c.update(norm, lr)
            if record:
                rec.update(global_norm=norm, lr=lr)
                for s, c in enumerate(comps):
                    rec["stages"][s].update(next_state=host(c.snapshot()), grad_sq_norm=sq[s])
                return rec
    raise AssertionError("unreachable")


def artifacts(case: Case, rec: dict, stage: int, kind: int, dtype: str, tolerance: float, cross: float,
              target_class: str, dataset: Dataset, tamper=None, tamper_update=None) -> Artifacts:
    model, train = specs(case, dtype)
    st = rec["stages"][stage]
    req = pb.AuditRequest(
        kind=kind, step=rec["step"], stage=stage, micro_batch=0, num_stages=STAGES, tolerance=tolerance,
        cross_device_tolerance=cross, target_device=target_class, model=model, train=train,
        report=pb.StepReport(step=rec["step"], stage=stage, state_digest=DIGEST, grad_sq_norm=st["grad_sq_norm"]),
        update=pb.ApplyUpdateRequest(step=rec["step"], global_grad_norm=rec["global_norm"], lr=rec["lr"]),
        update_report=pb.UpdateReport(step=rec["step"], stage=stage, state_digest=NEXT_DIGEST))
    art = Artifacts(request=req, attestation=pb.StateAttestation(state_digest=DIGEST), state=st["state"])
    mbs = list(range(case.micro_batches)) if kind == pb.AUDIT_KIND_UPDATE else [0]
    for mb in mbs:
        if stage > 0:
            art.inputs[mb] = ReceivedTensor(pb.TensorCommitment(), st["inputs"][mb])
        if stage < STAGES - 1 and kind != pb.AUDIT_KIND_FORWARD:
            art.grads_in[mb] = ReceivedTensor(pb.TensorCommitment(), st["grads_in"][mb])
        for d in (FORWARD, BACKWARD):
            wanted = kind == pb.AUDIT_KIND_UPDATE or (d == FORWARD) == (kind == pb.AUDIT_KIND_FORWARD)
            if wanted and (d, mb) in st["outputs"]:
                claimed = st["outputs"][(d, mb)]
                art.outputs[(d, mb)] = ReceivedTensor(pb.TensorCommitment(), tamper(claimed) if tamper else claimed)
    if kind == pb.AUDIT_KIND_UPDATE:
        art.next_state = st["next_state"] if tamper_update is None else {
            n: tamper_update(st["state"][n], v) if n.startswith("param/") else v for n, v in st["next_state"].items()}
        art.next_attestation = pb.StateAttestation(state_digest=NEXT_DIGEST)
    if art.needs_tokens():
        art.fill_tokens(dataset)
    return art


def flip(fraction: float):
    def f(t: torch.Tensor) -> torch.Tensor:
        n = max(1, int(fraction * t.numel()))
        idx = torch.randperm(t.numel(), generator=torch.Generator().manual_seed(7))[:n]
        out = t.clone().reshape(-1)
        out[idx] = -out[idx]
        return out.reshape(t.shape)
    return f


ATTACKS = {  # (audit kind, tamper of a sent activation, tamper of the update), smallest first within a kind
    "activation x (1 + 1e-3)": ("forward", lambda t: t * (1 + 1e-3), None),
    "activation x (1 + 1e-2)": ("forward", lambda t: t * (1 + 1e-2), None),
    "0.1% of activation signs flipped": ("forward", flip(1e-3), None),
    "1% of activation signs flipped": ("forward", flip(1e-2), None),
    "optimizer step x 1.05": ("update", None, lambda old, new: old + 1.05 * (new - old)),
    "optimizer step x 1.5": ("update", None, lambda old, new: old + 1.5 * (new - old)),
}


def audit_pair(case: Case, rec: dict, claimant: Party, auditor: Party, dtype: str, replay_dtype: str,
               tolerance: float, cross: float, dataset: Dataset) -> dict:
    """Largest honest deviation per kind, and the attacks, for one (claimant, auditor) pair."""
    dev, cls = auditor.torch_device, auditor.cls
    same = cls == claimant.cls
    tol = tolerance if same else max(tolerance, cross)
    worst: dict[str, float] = {}
    with auditor.determinism().scope():
        for stage in range(STAGES):
            kinds = {"update": pb.AUDIT_KIND_UPDATE}
            if stage < STAGES - 1:
                kinds["forward"] = pb.AUDIT_KIND_FORWARD
            if stage > 0:
                kinds["backward"] = pb.AUDIT_KIND_BACKWARD
            for name, kind in kinds.items():
                raw = check(artifacts(case, rec, stage, kind, replay_dtype, 0.0, 0.0, claimant.cls, dataset), dev, cls)
                worst[f"{name} (raw)"] = max(worst.get(f"{name} (raw)", 0.0), raw.deviation)
                if kind == pb.AUDIT_KIND_UPDATE:  # compared with the pair's tolerance through the honest range
                    at = check(artifacts(case, rec, stage, kind, replay_dtype, tolerance, cross, claimant.cls, dataset),
                               dev, cls)
                    worst[f"update@{tol:g}"] = max(worst.get(f"update@{tol:g}", 0.0), at.deviation)
        attacks = {}
        for name, (kind, tamper, tamper_update) in ATTACKS.items():
            k = pb.AUDIT_KIND_FORWARD if kind == "forward" else pb.AUDIT_KIND_UPDATE
            f = check(artifacts(case, rec, 1, k, replay_dtype, tolerance, cross, claimant.cls, dataset, tamper=tamper,
                                tamper_update=tamper_update), dev, cls)
            attacks[name] = f.deviation
    compared = max(worst.get("forward (raw)", 0.0), worst.get("backward (raw)", 0.0), worst.get(f"update@{tol:g}", 0.0))
    caught = [n for n, d in attacks.items() if d > tol]
    return {"model": case.name, "dtype": dtype, "replayed_as": replay_dtype, "claimant": str(claimant),
            "auditor": str(auditor), "same_class": same, "tolerance": tol, "worst": worst,
            "largest_honest": compared, "margin": (tol / compared) if compared > 0 else math.inf,
            "honest_passes": compared <= tol, "attacks": attacks,
            "smallest_caught": {kind: next((n for n in caught if ATTACKS[n][0] == kind), None)
                                for kind in ("forward", "update")}}


def pairs(gpu: bool) -> list[tuple[Party, Party, str, str]]:
    """(claimant, auditor, dtype, replayed dtype)."""
    c1, c2, c4 = Party("cpu", 1), Party("cpu", 2), Party("cpu", 4)
    out = [(c1, c1, "fp32", "fp32"), (c1, c2, "fp32", "fp32"), (c1, c4, "fp32", "fp32"), (c2, c1, "fp32", "fp32"),
           (c1, c1, "bf16", "bf16"), (c1, c2, "bf16", "bf16"), (c1, c1, "fp32", "bf16")]
    if gpu:
        g = Party("cuda", 1)
        out += [(g, g, "fp32", "fp32"), (g, c1, "fp32", "fp32"), (c1, g, "fp32", "fp32"),
                (g, g, "bf16", "bf16"), (g, c1, "bf16", "bf16")]
    return out


def run(models: list[str], gpu: bool, tolerance: float, cross: float, log=print) -> list[dict]:
    dataset = stdlib_corpus(DATA_BYTES)
    rows = []
    for name in models:
        case = CASES[name]
        claims: dict[tuple[str, str], dict] = {}
        for claimant, auditor, dtype, replay in pairs(gpu):
            t0 = time.perf_counter()
            key = (str(claimant), dtype)
            if key not in claims:
                claims[key] = make_claims(case, claimant, dtype, dataset)
            row = audit_pair(case, claims[key], claimant, auditor, dtype, replay, tolerance, cross, dataset)
            rows.append(row)
            log(f"{name:<6} {dtype}->{replay:<5} {row['claimant']:>12} -> {row['auditor']:<20} tol {row['tolerance']:<7g} "
                f"largest honest {row['largest_honest']:<9.3g} "
                f"({'PASS' if row['honest_passes'] else 'FAILS'}, margin {row['margin']:.3g}x)  "
                + "  ".join(f"{k}={v:.3g}" for k, v in row["worst"].items())
                + f"  smallest caught: {row['smallest_caught']}  [{time.perf_counter() - t0:.0f}s]")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--models", default="tiny,small", help="comma-separated: tiny, small, gpt2 (block 256)")
    ap.add_argument("--no-gpu", action="store_true", help="leave out the GPU pairs even where torch sees one")
    args = ap.parse_args()
    from coordinator.config import AuditConfig

    cfg = AuditConfig()
    gpu = torch.cuda.is_available() and not args.no_gpu
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, GPU: "
          f"{devices.device_class(torch.device('cuda', 0)) if gpu else 'none'}; audit.tolerance {cfg.tolerance:g}, "
          f"audit.cross_device_tolerance {cfg.cross_device_tolerance:g}")
    rows = run(args.models.split(","), gpu, cfg.tolerance, cfg.cross_device_tolerance)
    print(f"total {time.perf_counter() - t0:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "cpus": os.cpu_count(), "gpu": gpu,
                                               "tolerance": cfg.tolerance, "cross_device_tolerance":
                                               cfg.cross_device_tolerance, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
