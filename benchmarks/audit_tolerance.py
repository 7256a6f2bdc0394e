"""How far an honest recomputation lands from the original: calibrating ``audit.tolerance``.

    python benchmarks/audit_tolerance.py [--json PATH] [--quick]

About a minute on an idle 2-core machine (wall time grows with other processes' load).

A "claimant" process (this one, one torch thread, as a node runs by default) trains a
3-stage pipeline in one process through ``pipeguard.computation.StageComputation``, the
computation the node daemons run (forward and backward of each micro-batch in micro-batch
order, then the update with the global norm over all stages). At a chosen
step it records, for every stage, what the node would commit to: its state (weights and AdamW
state), the activations and gradients it received, the activations and input gradients it
sent, the ApplyUpdate order (global norm, lr) and its state after the update.

Then ``pipeguard.audit.check`` -- the very function auditors, the coordinator's judge and
``pipeguard verify`` run -- recomputes forward, backward and update audits of every stage
with tolerance 0 and reports the deviation it compares with the tolerance (for forward and
backward audits ``max|a - b| / max|b|``; for update audits whatever ``check`` uses at this
commit), plus two diagnostics of the new weights (max-element deviation per tensor, and the
relative L2 deviation of the whole weight update):

- in this process (the same process that made the claims: a sanity check, must be 0),
- in a fresh process with 1 torch thread, and
- in a fresh process with 2 torch threads (a node configured with ``threads = 2``, or an
  auditor on a machine with another core count).

Models: the ``tiny`` and ``small`` presets and two wider custom ones (3 blocks of width 512
and 768, the latter GPT-2's width), at step 0 (initial weights, empty AdamW state) and some
steps into training. Claims travel to the child processes as a ``torch.save`` file in a
temporary directory (a benchmark's private scratch file, never a wire format). Prints a table
and the largest deviation per thread setting, compares them with the default tolerance
(``AuditConfig.tolerance``), and prints what deviation some tampering produces (a cheating
activation, a cheating optimizer step), for scale. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeguard.audit import Artifacts, check
from pipeguard.computation import Determinism, StageComputation, StageSetup, model_spec, train_spec
from pipeguard.data import Dataset, stdlib_corpus
from pipeguard.model import GPTConfig, OptimSettings, lr_at, preset
from pipeguard.tensors import ReceivedTensor
from pipeguard.v1 import pipeguard_pb2 as pb

STAGES = 3
SEED = 1234
DATA_BYTES = 262144
FORWARD, BACKWARD = pb.DIRECTION_FORWARD, pb.DIRECTION_BACKWARD


@dataclass(frozen=True)
class Case:
    name: str
    gpt: GPTConfig
    micro_batches: int
    micro_batch_size: int
    steps: tuple[int, ...]
    """Steps at which claims are recorded (the pipeline trains up to each first)."""


def cases(quick: bool) -> list[Case]:
    out = [
        Case("tiny", preset("tiny"), 4, 8, (0, 40)),
        Case("small", preset("small"), 2, 2, (0, 3)),
        Case("w512", GPTConfig(block_size=64, n_layer=3, n_head=8, n_embd=512), 2, 4, (0, 10)),
        Case("w768", GPTConfig(block_size=64, n_layer=3, n_head=12, n_embd=768), 2, 4, (0, 2)),
    ]
    if quick:
        out = [Case(c.name, c.gpt, c.micro_batches, c.micro_batch_size, c.steps[:1] + (min(c.steps[-1], 3),))
               for c in out]
    return out


def optim_for(case: Case) -> OptimSettings:
    # A short schedule so that "some steps in" already sees a large learning rate.
    return OptimSettings(lr=3e-3, warmup_steps=2, total_steps=max(case.steps) + 10)


# -- the claimant: the pipeline as the nodes compute it ----------------------------------------------


class Pipeline:
    def __init__(self, case: Case, dataset: Dataset):
        self.case, self.dataset, self.optim = case, dataset, optim_for(case)
        self.comps = [StageComputation.build(StageSetup.from_specs(*specs(case), s, STAGES)) for s in range(STAGES)]

    def step(self, step: int, record: bool) -> dict | None:
        M = self.case.micro_batches
        last = STAGES - 1
        rec = {"step": step, "stages": [dict(inputs={}, grads_in={}, outputs={}) for _ in range(STAGES)]}
        if record:
            for s, c in enumerate(self.comps):
                rec["stages"][s]["state"] = c.snapshot()
        for mb in range(M):
            tokens, targets = self.comps[0].setup.batch(self.dataset, step, mb)  # (B, T) each
            fwds, x = [], tokens
            for s, c in enumerate(self.comps):  # forward, as each node's _forward
                fwds.append(c.forward(step, mb, x))
                if s < last:
                    x = fwds[-1].output.contiguous()  # (B, T, C)
                    if record:
                        rec["stages"][s]["outputs"][(FORWARD, mb)] = x.clone()
                        rec["stages"][s + 1]["inputs"][mb] = x.clone()
            g = targets
            for s in range(last, -1, -1):  # backward, as each node's _backward
                _, g = self.comps[s].backward(fwds[s], g)
                if s > 0:
                    g = g.contiguous()  # (B, T, C)
                    if record:
                        rec["stages"][s]["outputs"][(BACKWARD, mb)] = g.clone()
                        rec["stages"][s - 1]["grads_in"][mb] = g.clone()
        sq = [c.grad_sq_norm() for c in self.comps]  # each stage's StepReport.grad_sq_norm
        norm = math.sqrt(sum(sq))
        lr = lr_at(step, self.optim)
        for c in self.comps:
            c.update(norm, lr)
        if not record:
            return None
        rec.update(global_norm=norm, lr=lr)
        for s, c in enumerate(self.comps):
            rec["stages"][s]["next_state"] = c.snapshot()
            rec["stages"][s]["grad_sq_norm"] = sq[s]
        return rec


def make_claims(case: Case, dataset: Dataset) -> list[dict]:
    pipe = Pipeline(case, dataset)
    out = []
    for step in range(max(case.steps) + 1):
        r = pipe.step(step, record=step in case.steps)
        if r is not None:
            out.append(r)
    return out


# -- the auditor: pipeguard.audit.check over those claims -------------------------------------------


DIGEST, NEXT_DIGEST = b"\x01" * 32, b"\x02" * 32  # check() compares digests, not contents: same on both sides


def specs(case: Case) -> tuple[pb.ModelSpec, pb.TrainSpec]:
    """The run's wire specs, as the coordinator sends them to nodes and auditors."""
    return model_spec(case.gpt), train_spec(optim_for(case), seed=SEED, micro_batches=case.micro_batches,
                                            micro_batch_size=case.micro_batch_size)


UPDATE_TOLERANCES = (1e-5, 1e-4)
"""Update audits are also run at these tolerances: their honest range (``update_bounds``) widens
with the tolerance, so whether an honest update passes depends on it (rows ``update@TOL``)."""


def _request(case: Case, rec: dict, stage: int, kind: int, mb: int, tolerance: float = 0.0) -> pb.AuditRequest:
    model, train = specs(case)
    return pb.AuditRequest(
        kind=kind, step=rec["step"], stage=stage, micro_batch=mb, num_stages=STAGES, tolerance=tolerance,
        model=model, train=train,
        report=pb.StepReport(step=rec["step"], stage=stage, state_digest=DIGEST,
                             grad_sq_norm=rec["stages"][stage]["grad_sq_norm"]),
        update=pb.ApplyUpdateRequest(step=rec["step"], global_grad_norm=rec["global_norm"], lr=rec["lr"]),
        update_report=pb.UpdateReport(step=rec["step"], stage=stage, state_digest=NEXT_DIGEST),
    )


def _rt(t: torch.Tensor) -> ReceivedTensor:
    return ReceivedTensor(commitment=pb.TensorCommitment(), tensor=t)


def audit_stage(case: Case, rec: dict, stage: int, dataset: Dataset, tamper=None,
                tamper_update=None) -> dict[str, tuple[float, str]]:
    """Forward, backward and update audits of one stage: (deviation, check's detail) of each (tolerance 0).

    ``tamper(claimed output)`` and ``tamper_update(old weight, claimed new weight)`` return what a
    cheater would have sent or served instead, for scale."""
    st = rec["stages"][stage]
    M = case.micro_batches
    kinds = {"update": pb.AUDIT_KIND_UPDATE, **{f"update@{t:g}": pb.AUDIT_KIND_UPDATE for t in UPDATE_TOLERANCES}}
    if stage < STAGES - 1:
        kinds["forward"] = pb.AUDIT_KIND_FORWARD
    if stage > 0:
        kinds["backward"] = pb.AUDIT_KIND_BACKWARD
    out = {}
    for name, kind in kinds.items():
        mbs = list(range(M)) if kind == pb.AUDIT_KIND_UPDATE else [0]
        tol = float(name.split("@")[1]) if "@" in name else 0.0
        art = Artifacts(request=_request(case, rec, stage, kind, mbs[0], tol),
                        attestation=pb.StateAttestation(state_digest=DIGEST), state=st["state"])
        for mb in mbs:
            if stage > 0:
                art.inputs[mb] = _rt(st["inputs"][mb])
            if stage < STAGES - 1 and kind != pb.AUDIT_KIND_FORWARD:
                art.grads_in[mb] = _rt(st["grads_in"][mb])
            for d in (FORWARD, BACKWARD):
                wanted = kind == pb.AUDIT_KIND_UPDATE or (d == FORWARD) == (kind == pb.AUDIT_KIND_FORWARD)
                if wanted and (d, mb) in st["outputs"]:
                    claimed = st["outputs"][(d, mb)]
                    art.outputs[(d, mb)] = _rt(tamper(claimed) if tamper else claimed)
        if kind == pb.AUDIT_KIND_UPDATE:
            art.next_state = st["next_state"] if tamper_update is None else {
                n: tamper_update(st["state"][n], v) if n.startswith("param/") else v
                for n, v in st["next_state"].items()}
            art.next_attestation = pb.StateAttestation(state_digest=NEXT_DIGEST)
        if art.needs_tokens():
            art.fill_tokens(dataset)
        finding = check(art)
        out[name] = (finding.deviation, finding.detail)
        if kind != pb.AUDIT_KIND_UPDATE:  # the rule before issue 11: max|a - b| / max|b|
            old = [(old_rule(t, art.outputs[(FORWARD if k.startswith("forward") else BACKWARD, int(k.split("/")[1]))]
                             .tensor), k) for k, t in finding.recomputed.items()]
            out[f"{name}:old rule"] = max(old) if old else (0.0, "")
        if name == "update":  # the new weights alone, in two metrics
            new = {k.removeprefix("next/"): t.double() for k, t in finding.recomputed.items() if k.startswith("next/")}
            params = [(old_rule(t, art.next_state[k]), k) for k, t in new.items()]
            out["update:new weights"] = max(params) if params else (0.0, "")
            diff = sum(float(((t - art.next_state[k].double())).pow(2).sum()) for k, t in new.items())
            ref = sum(float((art.next_state[k].double() - st["state"][k].double()).pow(2).sum()) for k in new)
            out["update:rel L2 of update"] = (math.sqrt(diff / ref) if ref > 0 else 0.0, "")
    return out


def old_rule(got: torch.Tensor, claimed: torch.Tensor) -> float:
    """max|a - b| / max|b|: what audits compared before issue 11 (for comparison only)."""
    diff = float((got.double() - claimed.double()).abs().max())
    return 0.0 if diff == 0 else diff / float(claimed.double().abs().max())


def audit_all(case: Case, claims: list[dict], dataset: Dataset) -> list[dict]:
    rows = []
    for rec in claims:
        for stage in range(STAGES):
            for kind, (dev, detail) in audit_stage(case, rec, stage, dataset).items():
                rows.append({"model": case.name, "step": rec["step"], "stage": stage, "kind": kind, "deviation": dev,
                             "detail": detail})
    return rows


# -- orchestration ---------------------------------------------------------------------------------


def child(path: Path, threads: int, out: Path) -> None:
    Determinism(threads).apply()
    blob = torch.load(path, weights_only=True)
    case = Case(blob["case"]["name"], GPTConfig(**blob["case"]["gpt"]), blob["case"]["micro_batches"],
                blob["case"]["micro_batch_size"], tuple(blob["case"]["steps"]))
    t0 = time.perf_counter()
    rows = audit_all(case, blob["claims"], stdlib_corpus(DATA_BYTES))
    out.write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - t0}))


def in_child(path: Path, threads: int, scratch: Path, timeout: float) -> list[dict]:
    out = scratch / f"rows-{path.stem}-{threads}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, __file__, "--child", str(path), "--threads", str(threads), "--child-out", str(out)],
                   check=True, timeout=timeout, env=env)
    return json.loads(out.read_text())["rows"]


def ride(t: torch.Tensor, share: float, tolerance: float) -> torch.Tensor:
    """``forward:ride``'s push: every element by share x tolerance x (|x| + rms(x)), fixed signs."""
    x = t.double()
    d = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    return (x + share * tolerance * (x.abs() + x.pow(2).mean().sqrt()) * d).to(t.dtype)


def attack_scale(case: Case, rec: dict, dataset: Dataset, tolerance: float) -> dict[str, float]:
    """What check() reports for a tampered output (forward audit) or a tampered optimizer step
    (update audit) of stage 1, for scale: the deviation it compares with the tolerance."""
    g = torch.Generator().manual_seed(0)
    tampers = {
        "activation negated (forward:reverse)": lambda t: -t,
        "activation scaled by 1 + 1e-3": lambda t: t * (1 + 1e-3),
        "activation + N(0, (1e-4 max|y|)^2)": lambda t: t + 1e-4 * t.abs().max() * torch.randn(t.shape, generator=g),
        "activation scaled by 1 + 1e-4": lambda t: t * (1 + 1e-4),
        "small elements moved by 0.9e-3 max|y| (old rule's ride)":
            lambda t: t + 0.9e-3 * t.abs().max() * torch.where(t.abs() < t.abs().max() / 4, -torch.sign(t), 0),
        f"forward:ride at 0.9 x tolerance": lambda t: ride(t, 0.9, tolerance),
        f"forward:ride at 1.1 x tolerance": lambda t: ride(t, 1.1, tolerance),
    }
    out = {name: audit_stage(case, rec, 1, dataset, tamper=f)["forward"][0] for name, f in tampers.items()}

    def scaled(k: float):
        return lambda old, new: old + k * (new - old)

    def edit_four(by: float):
        def f(old, new):
            if new.dim() < 2:
                return new
            new = new.clone()
            new.view(-1)[:4] += by
            return new
        return f

    update_tampers = {
        "optimizer step scaled by 1.05": scaled(1.05),
        "optimizer step scaled by 1.5": scaled(1.5),
        "4 entries of every matrix moved by 0.0005": edit_four(0.0005),
        "4 entries of every matrix moved by 0.003": edit_four(0.003),
    }
    for name, f in update_tampers.items():
        out[name] = audit_stage(case, rec, 1, dataset, tamper_update=f)[f"update@{tolerance:g}"][0]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--quick", action="store_true", help="fewer training steps before the later measurement")
    ap.add_argument("--timeout", type=float, default=150.0, help="limit for each child process (s)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child), args.threads, Path(args.child_out))
        return 0

    from coordinator.config import AuditConfig

    tolerance = AuditConfig().tolerance
    Determinism(1).apply()
    t_start = time.perf_counter()
    dataset = stdlib_corpus(DATA_BYTES)
    rows: list[dict] = []
    scale: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="pipeguard-tolerance-") as tmp:
        scratch = Path(tmp)
        for case in cases(args.quick):
            t0 = time.perf_counter()
            claims = make_claims(case, dataset)
            path = scratch / f"{case.name}.pt"
            torch.save({"case": {**asdict(case), "gpt": asdict(case.gpt)}, "claims": claims}, path)
            same = audit_all(case, claims, dataset)
            if not scale:
                scale = attack_scale(case, claims[-1], dataset, tolerance)
            other = {n: in_child(path, n, scratch, args.timeout) for n in (1, 2)}
            for a, b, c in zip(same, other[1], other[2]):
                assert (a["model"], a["step"], a["stage"], a["kind"]) == (b["model"], b["step"], b["stage"], b["kind"])
                rows.append({**a, "same_process": a.pop("deviation"), "other_1_thread": b["deviation"],
                             "other_2_threads": c["deviation"], "detail_2_threads": c["detail"]})
            params = sum(c.num_params for c in Pipeline(case, dataset).comps)
            print(f"# {case.name}: {params / 1e6:.2f}M params, {case.gpt.n_layer} layers x {case.gpt.n_embd} wide, "
                  f"block {case.gpt.block_size}; {case.micro_batches} micro-batches x {case.micro_batch_size} "
                  f"sequences; steps {list(case.steps)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    cols = ("same_process", "other_1_thread", "other_2_threads")
    print(f"\nhonest deviation reported by pipeguard.audit.check (forward, backward, update rows: what it compares "
          f"with the tolerance), and two diagnostics of the update audit (update:new weights = max|a-b|/max|b| per "
          f"weight tensor, the metric update audits used before b7e49b8; update:rel L2 of update = "
          f"|new_a - new_b| / |new_b - old| over the stage's weights). Claims: 1 thread; {STAGES} stages; "
          f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs\n")
    print(f"{'model':<6} {'step':>4} {'stage':>5} {'audit':<24} {'same proc':>10} {'1 thread':>10} {'2 threads':>10}")
    for r in rows:
        print(f"{r['model']:<6} {r['step']:>4} {r['stage']:>5} {r['kind']:<24} "
              + " ".join(f"{r[c]:>10.3g}" for c in cols))
    # What check() compares with the default tolerance: forward, backward, and the update audit run
    # at that tolerance (its honest range depends on it).
    compared = [r for r in rows if r["kind"] in ("forward", "backward", f"update@{tolerance:g}")]
    worst = {c: max(r[c] for r in compared) for c in cols}
    where = {c: max(compared, key=lambda r: r[c]) for c in cols}
    print()
    for c, label in zip(cols, ("same process, 1 thread", "other process, 1 thread", "other process, 2 threads")):
        w = where[c]
        head = ("bit-identical" if worst[c] == 0 else "EXCEEDS it" if worst[c] > tolerance
                else f"{tolerance / worst[c]:.2g}x headroom")
        print(f"max {label:<26} {worst[c]:.3g}  (at {w['model']} step {w['step']} stage {w['stage']} {w['kind']}); "
              f"default tolerance {tolerance:g}: {head}")
    for kind in ("forward", "backward", "update", *(f"update@{t:g}" for t in UPDATE_TOLERANCES), "forward:old rule", "backward:old rule", "update:new weights",
                 "update:rel L2 of update"):
        m = max(r["other_2_threads"] for r in rows if r["kind"] == kind)
        print(f"  2 threads, {kind + ':':<25} max {m:.3g}")
    for r in [r for r in compared if r["other_2_threads"] > tolerance]:
        print(f"  OVER TOLERANCE with 2 threads: {r['model']} step {r['step']} stage {r['stage']} {r['kind']} audit: "
              f"{r['detail_2_threads']}")
    exact = max(r["other_1_thread"] for r in rows if "@" not in r["kind"]) == 0.0
    print(f"exact mode (tolerance 0) with identical thread counts: {'HOLDS' if exact else 'FAILS'} "
          f"(every recomputation in a fresh 1-thread process is {'bit-identical' if exact else 'NOT bit-identical'})")
    raw = max(r["other_2_threads"] for r in rows if r["kind"] in ("forward", "backward", "update"))
    print(f"exact mode across thread counts (1 vs 2): {'holds' if raw == 0 else 'fails'}")
    print("\nfor scale, audits of stage 1 (tiny, last step) when the node tampered with what it sent or served:")
    for name, dev in scale.items():
        print(f"  {name:<42} deviation {dev:.3g}  -> {'caught' if dev > tolerance else 'PASSES'} at tolerance "
              f"{tolerance:g}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"tolerance": tolerance, "rows": rows, "max": worst,
                                               "exact_mode_same_threads": exact, "attack_scale": scale,
                                               "torch": torch.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
