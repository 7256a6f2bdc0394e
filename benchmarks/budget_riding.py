"""What a node that spends the whole audit allowance every step does to training.

    python benchmarks/budget_riding.py [--steps N] [--json PATH]

About 4 minutes for 240 steps on an idle 2-core machine (it grows with other processes' load).

A 3-stage pipeline of the ``tiny`` model trains in one process through
``pipeguard.computation.StageComputation`` (the code the node daemons run), once clean and once
with stage 1 riding the budget on every message and every step, with the built-in behaviours
of ``node/attacks.py`` applied where the node's seams apply them:

- ``forward:ride``: every activation element it sends moved by the whole per-element allowance
  (``ride`` = 1: tolerance x (|x| + rms(x)), at the default tolerance), one fixed direction per
  element for every message, so the push accumulates;
- ``backward:ride``: every input-gradient element it sends moved by the same allowance against
  its own sign (every small gradient element flipped);
- ``update:ride``: every one of its weights steered, one fixed direction per weight, to the edge
  of what an update audit accepts (``pipeguard.computation.update_bounds`` plus the tolerance floor).

A third run rides the rule audits used before issue 11 (every activation/gradient element moved
by 0.999e-3 x the tensor's largest element; 4 chosen entries of every weight matrix pushed so
that the whole stage's update deviates by 0.999e-3 in relative L2) for comparison.

Each run reports the mean training loss of its last 20 steps and the validation loss on 16
fixed held-out micro-batches at the end; the figure of merit is the riding run's validation loss
over the clean run's (issue 11's target: an effect below 1%). Riding within the allowance is
never convicted (tests/test_tolerance.py, tests/test_tolerance_servers.py), so this is the most
such an attacker gets. Prints the figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from node.attacks import AttackContext, Params, Ride, UpdateRide
from pipeguard.audit import DEFAULT_TOLERANCE
from pipeguard.computation import Determinism, StageComputation, StageSetup, model_spec, train_spec
from pipeguard.data import Dataset, stdlib_corpus
from pipeguard.model import OptimSettings, StageModule, lr_at, preset
from pipeguard.v1 import pipeguard_pb2 as pb

STAGES, RIDER, SEED, M, B = 3, 1, 1234, 4, 8
DATA_BYTES = 1 << 20
VAL_BATCHES = 16
FORWARD, BACKWARD = pb.DIRECTION_FORWARD, pb.DIRECTION_BACKWARD
OLD_TOLERANCE = 1e-3


class Rider:
    """What stage 1 does to what it sends and to its update (None: honest)."""

    def forward(self, step: int, mb: int, y: torch.Tensor) -> torch.Tensor:
        return y

    def backward(self, step: int, mb: int, g: torch.Tensor) -> torch.Tensor:
        return g

    def before_update(self, step: int, comp: StageComputation, norm: float, lr: float) -> None:
        pass

    def after_update(self, step: int, comp: StageComputation, before: dict[str, torch.Tensor]) -> None:
        pass


class NewRuleRider(Rider):
    """The built-in ride behaviours at ``ride`` (1.0: the whole allowance)."""

    def __init__(self, ride: float):
        p = Params(ride=ride, seed=7)
        self.fwd, self.bwd, self.upd = Ride("forward", p), Ride("backward", p), UpdateRide(p)

    @staticmethod
    def ctx(step: int, mb: int = -1, direction: int = 0) -> AttackContext:
        return AttackContext(step, mb, RIDER, "rider", direction)

    def forward(self, step, mb, y):
        return self.fwd.tamper(self.ctx(step, mb, FORWARD), y)

    def backward(self, step, mb, g):
        return self.bwd.tamper(self.ctx(step, mb, BACKWARD), g)

    def before_update(self, step, comp, norm, lr):
        self.upd.on_gradients(self.ctx(step), comp.module, comp.opt, norm, lr, comp.setup.optim.grad_clip)

    def after_update(self, step, comp, before):
        self.upd.on_update(self.ctx(step), comp.module, comp.opt, before)


class OldRuleRider(Rider):
    """Rides max|a - b| / max|b| <= 1e-3 (tensors) and relative L2 <= 1e-3 (updates)."""

    SHARE = 0.999

    def _dir(self, shape) -> torch.Tensor:
        g = torch.Generator().manual_seed(7)
        return torch.randint(0, 2, tuple(shape), generator=g, dtype=torch.float64) * 2 - 1

    def forward(self, step, mb, y):
        x = y.double()
        return (x + self.SHARE * OLD_TOLERANCE * x.abs().max() * self._dir(x.shape)).to(y.dtype)

    def backward(self, step, mb, g):
        x = g.double()
        return (x - self.SHARE * OLD_TOLERANCE * x.abs().max() * torch.where(x >= 0, 1.0, -1.0)).to(g.dtype)

    def after_update(self, step, comp, before):
        with torch.no_grad():
            params = sorted(comp.module.named_parameters())
            total = math.sqrt(sum(float((p.double() - before[f"param/{n}"].double()).pow(2).sum()) for n, p in params))
            chosen = [(n, p) for n, p in params if p.dim() >= 2]
            push = self.SHARE * OLD_TOLERANCE * total / math.sqrt(4 * len(chosen))
            for _, p in chosen:
                p.view(-1)[:4] += push


def train(dataset: Dataset, steps: int, rider: Rider) -> dict:
    gpt = preset("tiny")
    optim = OptimSettings(lr=3e-3, warmup_steps=10, total_steps=steps)
    model, tspec = model_spec(gpt), train_spec(optim, seed=SEED, micro_batches=M, micro_batch_size=B)
    comps = [StageComputation.build(StageSetup.from_specs(model, tspec, s, STAGES)) for s in range(STAGES)]
    last = STAGES - 1
    losses = []
    for step in range(steps):
        total = 0.0
        for mb in range(M):
            tokens, targets = comps[0].setup.batch(dataset, step, mb)  # (B, T) each
            fwds, x = [], tokens
            for s, c in enumerate(comps):
                fwds.append(c.forward(step, mb, x))
                if s < last:
                    x = fwds[-1].output.contiguous()  # (B, T, C)
                    if s == RIDER:
                        x = rider.forward(step, mb, x)
            g = targets
            for s in range(last, -1, -1):
                loss, g = comps[s].backward(fwds[s], g)
                total += loss
                if s > 0:
                    g = g.contiguous()  # (B, T, C)
                    if s == RIDER:
                        g = rider.backward(step, mb, g)
        losses.append(total / M)
        norm = math.sqrt(sum(c.grad_sq_norm() for c in comps))
        lr = lr_at(step, optim)
        for s, c in enumerate(comps):
            if s == RIDER:
                before = c.snapshot()
                rider.before_update(step, c, norm, lr)
                c.update(norm, lr)
                rider.after_update(step, c, before)
            else:
                c.update(norm, lr)
    val = 0.0
    with torch.no_grad():  # the trained weights, honestly evaluated
        for i in range(VAL_BATCHES):
            x, y = dataset.batch(SEED, 0, i, B, gpt.block_size, split="val")  # (B, T) each
            for s, c in enumerate(comps):
                x = c.forward(10 ** 6, i, x).output
            val += float(StageModule.loss(x, y)) / VAL_BATCHES
    return {"train_last20": sum(losses[-20:]) / 20, "val": val, "loss_curve": losses}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    Determinism(1).apply()
    dataset = stdlib_corpus(DATA_BYTES)
    runs = {"clean": Rider(), "ride (new rule, whole allowance)": NewRuleRider(1.0),
            "ride (old rule, whole allowance)": OldRuleRider()}
    out = {}
    for name, rider in runs.items():
        t0 = time.perf_counter()
        out[name] = train(dataset, args.steps, rider)
        print(f"# {name}: {time.perf_counter() - t0:.0f}s", flush=True)
    clean = out["clean"]
    print(f"\ntiny model (4 x 64), {STAGES} stages, {M} micro-batches x {B} sequences, {args.steps} steps; "
          f"stage {RIDER} rides every message and update from step 0; default tolerance {DEFAULT_TOLERANCE:g}\n")
    print(f"{'run':<36} {'train loss (last 20)':>21} {'val loss':>9} {'val / clean':>12}")
    for name, r in out.items():
        print(f"{name:<36} {r['train_last20']:>21.4f} {r['val']:>9.4f} {r['val'] / clean['val']:>12.4f}")
    ratio = out["ride (new rule, whole allowance)"]["val"] / clean["val"]
    print(f"\nnew rule: the whole allowance, spent every step, changes the final validation loss by "
          f"{100 * (ratio - 1):+.3f}% (target: |effect| < 1%)")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "tolerance": DEFAULT_TOLERANCE,
                                               "runs": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
