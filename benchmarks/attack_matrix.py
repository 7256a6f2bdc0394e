"""The attack matrix: every built-in behaviour against a small real testnet, defence on.

    python benchmarks/attack_matrix.py --out docs/            # the whole matrix, p = 0.05 and p = 1
    python benchmarks/attack_matrix.py --quick                # a short subset
    python benchmarks/attack_matrix.py --only forward:reverse --p 1
    python benchmarks/attack_matrix.py --curve 40 --out docs/ # the detection curve only (needs matplotlib)
    pipeguard experiment matrix ...                           # the same

Every run is a ``pipeguard.testnet.LocalTestnet``: a coordinator and four node daemons on
loopback (three stages of the tiny GPT registered in order, node i serves stage i, and node 3
stands by; the standby is the auditor the scheduler prefers), signatures on, screen on, audits at
the row's p, ``--steps`` steps (default 16) of 4 micro-batches of 4 sequences, bounded by
``--run-timeout`` seconds of wall time. The attacker is stage 1's node (node 1); the lying
auditors (``audit:accuse``, ``audit:clear``) are the standby. Tensor attacks fire at rate
``--rate`` (default 0.5) from step ``--start`` (default 2) on.

Read from the coordinator's status (``pipeguard status --json`` sees the same): bans (and
whether any honest node was banned), the first ``banned`` event of the attacker and the last
``step`` event before it (steps until ban = steps completed at the ban - the attack's start
step), audits dispatched when the ban was first seen (polled, so an upper bound by one poll),
``rolled_back``/``stage_assigned``/``stage_skipped`` events (what the system did), evidence
bundles (each re-checked with ``pipeguard.evidence.verify_bundle``), and the final training
losses. Final loss vs clean is the mean of the run's last three step losses over the mean of the
same steps of the single-process reference trainer (``pipeguard.reference``) with the same seed,
model and batches: the pipeline reproduces it exactly when nothing is poisoned.

Detection curve (``--curve N``): N trials of ``forward:reverse`` at rate ``--curve-rate`` on
stage 1 with p = 0.05 and the screen OFF, each with its own attack seed, so only random audits
can catch it. The attacker logs every poisoned message (DEBUG ``attack ... fired``); k is the
number of poisoned messages it sent in steps up to and including the step of the audit that
convicted it. What the scheduler does (coordinator/audits.py ``select``/``select_updates``):
every (stage, micro-batch, direction) output is audited with probability p independently, and
so is each stage's optimizer update, which recomputes all of the step's micro-batches. So a
step with n poisoned forward messages escapes with probability (1 - p)^(n + 1): each poisoned
message is one audit chance, and the update built on them is one more. In units of such
*poisoned commitments* c (poisoned messages + poisoned steps) detection is 1 - (1 - p)^c
exactly; per poisoned message it is 1 - (1 - p)^(k + steps(k)). Both are plotted, the empirical
CDF with a DKW 95% band, and a KS distance is printed for each.

Writes ``attack-matrix.md``, ``attack-matrix.json`` (and ``attack-matrix.png`` for the curve)
under ``--out``. Asserts nothing; an honest node's ban is printed loudly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeguard.data import stdlib_corpus  # noqa: E402
from pipeguard.evidence import verify_bundle  # noqa: E402
from pipeguard.model import GPTConfig, OptimSettings  # noqa: E402
from pipeguard.reference import train_reference  # noqa: E402
from pipeguard.testnet import LocalTestnet, TestnetError  # noqa: E402
from pipeguard.v1 import pipeguard_pb2 as pb  # noqa: E402

SEED = 7
MICRO_BATCHES = 4
MICRO_BATCH_SIZE = 4
DATA_BYTES = 262144
GPT = GPTConfig(block_size=32, n_layer=3, n_head=2, n_embd=32)
ATTACKER, STANDBY = 1, 3
"""Node indices: the attacker serves stage 1; the standby (node 3) is the preferred auditor."""

RUN_TOML = """\
[model]
preset = "tiny"
n_layer = 3
n_embd = 32
n_head = 2
block_size = 32

[train]
steps = {steps}
micro_batches = {mb}
micro_batch_size = {mbs}
seed = {seed}
warmup_steps = 2

[pipeline]
stages = 3
min_nodes = 4

[data]
max_bytes = {data}

[audit]
rate = {p}
screen = {screen}
checkpoint_every = 4
retention = 4
{audit_extra}
[timeouts]
heartbeat_interval = 0.2
heartbeat_timeout = 3.0
step = 20.0
"""

TENSOR_KINDS = ["reverse", "random", "noise", "scale", "zero", "sign-flip", "constant-direction", "stale"]
PROTOCOL = ["wire:bad-signature", "wire:replay", "wire:equivocate", "state:false-commitment", "update:skip",
            "update:poison", "audit:accuse", "audit:clear", "node:silent", "node:slow"]
QUICK = ["forward:reverse", "backward:noise", "audit:accuse", "collude:reverse+clear"]


@dataclass
class Case:
    name: str
    family: str
    attack: dict = field(default_factory=dict)
    """[attack] table of the attacker (node 1)."""
    liar: dict = field(default_factory=dict)
    """[attack] table of the standby (node 3); ``accomplices = "ATTACKER"`` is filled in."""
    note: str = ""

    @property
    def start(self) -> int:
        return int(self.attack.get("start_step", self.liar.get("start_step", 0)))


def cases(rate: float, start: int, patient: int) -> list[Case]:
    out = []
    for direction in ("forward", "backward"):
        for kind in TENSOR_KINDS:
            name = f"{direction}:{kind}"
            extra = {}
            if kind == "noise":
                extra = {"noise_scale": 0.5}  # half the tensor's own std: no outlier in norm
            out.append(Case(name, "tensor", {"behaviours": [name], "rate": rate, "start_step": start, **extra}))
    for name in PROTOCOL:
        if name.startswith("audit:"):
            out.append(Case(name, "protocol", liar={"behaviours": [name], "rate": 1.0}))
        else:
            out.append(Case(name, "protocol", {"behaviours": [name], "rate": rate, "start_step": start}))
    out.append(Case(f"patient:reverse(start={patient})", "coordinated",
                    {"behaviours": ["forward:reverse"], "rate": rate, "start_step": patient},
                    note=f"honest for {patient} steps, then forward:reverse"))
    out.append(Case("collude:reverse+clear", "coordinated",
                    {"behaviours": ["forward:reverse"], "rate": rate, "start_step": start},
                    liar={"behaviours": ["audit:clear"], "rate": 1.0, "accomplices": "ATTACKER"},
                    note="stage 1 reverses; the standby auditor signs PASS for it"))
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def node_toml(attack: dict) -> str:
    return "[attack]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in attack.items())


# -- the clean reference ---------------------------------------------------------------------------


_CLEAN: dict[int, list[float]] = {}


def clean_losses(steps: int) -> list[float]:
    if steps not in _CLEAN:
        torch.set_num_threads(1)
        optim = OptimSettings(lr=3e-3, warmup_steps=2, total_steps=steps)
        _CLEAN[steps] = train_reference(GPT, optim, stdlib_corpus(DATA_BYTES), seed=SEED, steps=steps,
                                        micro_batches=MICRO_BATCHES, micro_batch_size=MICRO_BATCH_SIZE).losses
    return _CLEAN[steps]


# -- one run ----------------------------------------------------------------------------------------


@dataclass
class RunResult:
    behaviour: str
    family: str
    p: float
    detected: bool = False
    steps_until_ban: int | None = None
    caught_step: int | None = None
    """Step of the audit that convicted the attacker (from the ban reason), if it names one."""
    audits_at_ban: int | None = None
    audits_total: int = 0
    honest_banned: int = 0
    banned: list[str] = field(default_factory=list)
    loss_vs_clean: float | None = None
    steps_done: int = 0
    finished: bool = False
    actions: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    """kind:VALID/INVALID of every bundle."""
    ban_reasons: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    note: str = ""
    error: str = ""


def _banned(status: pb.StatusReply) -> dict[str, str]:
    return {n.node_id: n.ban_reason for n in status.nodes if n.role == pb.ROLE_BANNED}


def run_case(case: Case, p: float, steps: int, timeout: float, workdir: Path, screen: bool = True,
             audit_extra: str = "", log_level: str = "") -> tuple[RunResult, pb.StatusReply | None, LocalTestnet]:
    res = RunResult(case.name, case.family, p, note=case.note)
    toml = RUN_TOML.format(steps=steps, mb=MICRO_BATCHES, mbs=MICRO_BATCH_SIZE, seed=SEED, data=DATA_BYTES, p=p,
                           screen="true" if screen else "false", audit_extra=audit_extra)
    net = LocalTestnet(workdir, toml)
    t0 = time.monotonic()
    status = None
    try:
        net.start_coordinator()
        guilty: set[str] = set()
        for i in range(4):
            table = case.attack if i == ATTACKER else case.liar if i == STANDBY else {}
            extra: list[str] = []
            if table:
                table = {k: ([net.nodes[ATTACKER].node_id] if v == "ATTACKER" else v) for k, v in table.items()}
                path = workdir / f"node{i}.toml"
                path.write_text(node_toml(table))
                extra = ["--config", str(path)]
                if log_level and i == ATTACKER:
                    extra += ["--log-level", log_level]
            net.start_node(*extra)
            net.wait_registered(i + 1)
            if table:
                guilty.add(net.nodes[i].node_id)
        at_ban = None
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if not net.coordinator.alive():
                raise TestnetError(f"coordinator died:\n{net.coordinator.log_tail()}")
            status = net.status(history=0)
            if at_ban is None and guilty & set(_banned(status)):
                at_ban = status.audits_total
            if status.phase in (pb.RUN_PHASE_FINISHED, pb.RUN_PHASE_FAILED):
                break
            time.sleep(0.5)
        status = net.status(history=5000)
        res.finished = status.phase == pb.RUN_PHASE_FINISHED
        bans = _banned(status)
        res.banned = sorted(("attacker " if n in guilty else "HONEST ") + n[:8] for n in bans)
        res.ban_reasons = [r for r in bans.values()]
        res.honest_banned = len(set(bans) - guilty)
        res.detected = bool(guilty & set(bans))
        res.audits_at_ban, res.audits_total = at_ban, status.audits_total
        res.steps_done = status.step
        events = list(status.events)
        ban_ev = next((e for e in events if e.kind == "banned" and e.node_id in guilty), None)
        if ban_ev is not None:
            done = [e.step + 1 for e in events if e.kind == "step" and e.seq < ban_ev.seq]
            res.steps_until_ban = max(0, (max(done) if done else 0) - case.start)
            m = AUDIT_STEP.search(bans.get(ban_ev.node_id, ""))
            res.caught_step = int(m.group(2)) if m else None
        kinds = [e.kind for e in events]
        if bans:
            res.actions.append("ban")
        for kind, label in (("rolled_back", "rollback"), ("stage_skipped", "skip")):
            if kind in kinds:
                res.actions.append(label)
        if any(e.kind == "stage_assigned" and e.seq > (ban_ev.seq if ban_ev else 0) for e in events) and \
                ("node_offline" in kinds or bans):
            res.actions.append("reassignment")
        for kind, label in (("step_failed", "step retried"), ("node_offline", "node offline"),
                            ("commitment_mismatch", "commitment mismatch seen")):
            if kind in kinds:
                res.actions.append(label)
        if not res.actions:
            res.actions.append("nothing")
        for path in status.evidence:
            v = verify_bundle(Path(path))
            res.evidence.append(f"{v.kind}:{'VALID' if v.valid else 'INVALID'}")
        losses = [(lp.step, lp.loss) for lp in status.losses]
        if len(losses) >= 3:
            clean = clean_losses(steps)
            tail = losses[-3:]
            got = sum(x for _, x in tail) / 3
            ref = sum(clean[s] for s, _ in tail) / 3
            res.loss_vs_clean = got / ref
    except (TestnetError, OSError, RuntimeError) as exc:
        res.error = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        res.wall_s = round(time.monotonic() - t0, 1)
        net.stop()
        net.kill()
    return res, status, net


def describe(res: RunResult) -> str:
    det = "yes" if res.detected else "no"
    return (f"{res.behaviour:34s} p={res.p:<5g} detected={det:3s} steps_to_ban={res.steps_until_ban} "
            f"audits={res.audits_at_ban}/{res.audits_total} honest_banned={res.honest_banned} "
            f"loss/clean={res.loss_vs_clean if res.loss_vs_clean is None else round(res.loss_vs_clean, 3)} "
            f"steps={res.steps_done} did={','.join(res.actions)} evidence={','.join(res.evidence) or '-'} "
            f"[{res.wall_s:.0f}s]{' ERROR ' + res.error if res.error else ''}")


# -- tables -----------------------------------------------------------------------------------------


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Attack matrix",
        "",
        f"Generated by `{meta['command']}` on {meta['when']} ({meta['machine']}); {meta['wall_min']:.1f} min.",
        f"Testnet: 3 stages of the tiny GPT + 1 standby, {MICRO_BATCHES} micro-batches x {MICRO_BATCH_SIZE}, "
        f"{meta['steps']} steps, screen on; attacker = stage 1's node (lying auditors: the standby); "
        f"tensor/protocol attacks at rate {meta['rate']} from step {meta['start']}. Each run bounded by "
        f"{meta['run_timeout']:.0f} s. See the script's docstring for how each column is measured.",
        "",
        "| behaviour | p | detected | steps until ban (audited step) | audits (at ban / run) | honest banned | "
        "final loss vs clean | system did | evidence |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        loss = "-" if r["loss_vs_clean"] is None else f"{r['loss_vs_clean']:.3f}"
        steps = "-" if r["steps_until_ban"] is None else str(r["steps_until_ban"])
        if r["caught_step"] is not None:
            steps += f" (step {r['caught_step']})"
        at = "-" if r["audits_at_ban"] is None else str(r["audits_at_ban"])
        ev = ", ".join(sorted(set(r["evidence"]))) or "-"
        det = "**yes**" if r["detected"] else "no"
        if r["error"]:
            det += " (run error)"
        elif not r["finished"]:
            det += f" (stopped at step {r['steps_done']})"
        lines.append(f"| {r['behaviour']} | {r['p']:g} | {det} | {steps} | {at} / {r['audits_total']} | "
                     f"{r['honest_banned']} | {loss} | {', '.join(r['actions'])} | {ev} |")
    return "\n".join(lines) + "\n"


# -- detection curve ------------------------------------------------------------------------------


FIRED = re.compile(r"attack \S+ fired on (forward|backward) step (\d+) mb (\d+)")
AUDIT_STEP = re.compile(r"(forward|backward|update) audit at step (\d+)")


def curve_trial(i: int, p: float, rate: float, steps: int, timeout: float, workdir: Path) -> dict:
    case = Case("forward:reverse", "tensor", {"behaviours": ["forward:reverse"], "rate": rate, "start_step": 0,
                                              "seed": 1000 + i})
    res, status, net = run_case(case, p, steps, timeout, workdir, screen=False, log_level="DEBUG")
    fired: set[tuple[int, int]] = set()
    try:
        for line in net.nodes[ATTACKER].log_path.read_text(errors="replace").splitlines():
            m = FIRED.search(line)
            if m and m.group(1) == "forward":
                fired.add((int(m.group(2)), int(m.group(3))))
    except (OSError, IndexError):
        pass
    by_step: dict[int, int] = {}
    for s, _ in fired:
        by_step[s] = by_step.get(s, 0) + 1
    caught_step = None
    if res.detected and res.ban_reasons:
        m = AUDIT_STEP.search(" ".join(res.ban_reasons))
        caught_step = int(m.group(2)) if m else None
    # The step sequence of poisoned-message counts, in order (the run's own gating).
    seq = [by_step.get(s, 0) for s in range(steps)]
    k = c = None
    if caught_step is not None:
        k = sum(seq[: caught_step + 1])
        c = k + sum(1 for n in seq[: caught_step + 1] if n > 0)
    return {"trial": i, "detected": res.detected, "caught_step": caught_step, "k": k, "c": c,
            "poisoned_per_step": seq, "honest_banned": res.honest_banned, "steps_done": res.steps_done,
            "wall_s": res.wall_s, "error": res.error, "ban_reasons": res.ban_reasons}


def expected_cdf_messages(seqs: list[list[int]], p: float, kmax: int) -> list[float]:
    """P(K <= k) under the scheduler's model, averaged over the trials' own gating sequences:
    after the poisoned steps up to one with cumulative k messages in s poisoned steps, the
    attacker has escaped with probability (1 - p)^(k + s)."""
    out = [0.0] * (kmax + 1)
    for seq in seqs:
        points, k, c = {}, 0, 0
        for n in seq:
            if n:
                k, c = k + n, c + n + 1
                points[k] = 1 - (1 - p) ** c
        cur = 0.0
        for j in range(kmax + 1):
            cur = points.get(j, cur)
            out[j] += cur / len(seqs)
    return out


def curve(args, out: Path) -> dict:
    p, rate, trials = 0.05, args.curve_rate, args.curve
    steps = args.curve_steps
    tmp = Path(tempfile.mkdtemp(prefix="pipeguard-curve-"))
    results = []
    t0 = time.monotonic()
    try:
        for i in range(trials):
            r = curve_trial(i, p, rate, steps, args.run_timeout, tmp / f"t{i}")
            results.append(r)
            print(f"[curve {i + 1}/{trials}] detected={r['detected']} caught_step={r['caught_step']} k={r['k']} "
                  f"c={r['c']} honest_banned={r['honest_banned']} [{r['wall_s']:.0f}s]"
                  f"{' ERROR ' + r['error'] if r['error'] else ''}", flush=True)
            shutil.rmtree(tmp / f"t{i}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    valid = [r for r in results if not r["error"]]
    n = len(valid)
    ks = sorted(r["k"] for r in valid if r["k"] is not None)
    cs = sorted(r["c"] for r in valid if r["c"] is not None)
    kmax = max([sum(r["poisoned_per_step"]) for r in valid] + [1])
    eps = math.sqrt(math.log(2 / 0.05) / (2 * max(n, 1)))  # DKW, 95%

    def ecdf(xs: list[int], j: int) -> float:  # censored trials count as "not yet" everywhere
        return sum(1 for x in xs if x <= j) / max(n, 1)

    exp_k = expected_cdf_messages([r["poisoned_per_step"] for r in valid], p, kmax)
    naive = [1 - (1 - p) ** j for j in range(kmax + 1)]
    # KS-style distances over the support where the observation window covers every trial.
    horizon_k = min([sum(r["poisoned_per_step"]) for r in valid] + [kmax])
    d_k = max((abs(ecdf(ks, j) - exp_k[j]) for j in range(horizon_k + 1)), default=0.0)
    d_naive = max((abs(ecdf(ks, j) - naive[j]) for j in range(horizon_k + 1)), default=0.0)
    cmax = max([r["c"] or 0 for r in valid] + [1])
    horizon_c = min([sum(x + (x > 0) for x in r["poisoned_per_step"]) for r in valid] + [cmax])
    d_c = max((abs(ecdf(cs, j) - (1 - (1 - p) ** j)) for j in range(horizon_c + 1)), default=0.0)
    summary = {
        "p": p, "rate": rate, "trials": trials, "valid_trials": n, "detected": len(ks), "steps": steps,
        "honest_banned": sum(r["honest_banned"] for r in valid), "dkw_eps_95": eps,
        "ks_messages_vs_scheduler": d_k, "ks_messages_vs_naive": d_naive, "ks_commitments_vs_formula": d_c,
        "horizon_messages": horizon_k, "horizon_commitments": horizon_c,
        "within_error_scheduler": d_k <= eps, "within_error_commitments": d_c <= eps,
        "within_error_naive": d_naive <= eps, "mean_k": (sum(ks) / len(ks)) if ks else None,
        "wall_min": (time.monotonic() - t0) / 60, "trials_detail": results,
    }
    print(f"curve: {len(ks)}/{n} detected within {steps} steps; DKW eps {eps:.3f}; KS vs scheduler model "
          f"{d_k:.3f}, vs 1-(1-p)^k {d_naive:.3f}, commitments vs 1-(1-p)^c {d_c:.3f}", flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        xs = list(range(kmax + 1))
        ax = axes[0]
        emp = [ecdf(ks, j) for j in xs]
        ax.step(xs, emp, where="post", label=f"measured ({n} trials)", color="C0")
        ax.fill_between(xs, [max(0, e - eps) for e in emp], [min(1, e + eps) for e in emp], step="post",
                        alpha=0.2, color="C0", label="DKW 95% band")
        ax.step(xs, exp_k, where="post", label="scheduler model: 1-(1-p)^(k+steps)", color="C1")
        ax.plot(xs, naive, label="1-(1-p)^k", color="C2", ls="--")
        ax.axvline(horizon_k, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("poisoned messages sent (k)")
        ax.set_ylabel("P(caught by then)")
        ax.set_title(f"forward:reverse r={rate}, p={p}, screen off")
        ax.legend(fontsize=8, loc="lower right")
        ax = axes[1]
        xc = list(range(cmax + 1))
        emp_c = [ecdf(cs, j) for j in xc]
        ax.step(xc, emp_c, where="post", label="measured", color="C0")
        ax.fill_between(xc, [max(0, e - eps) for e in emp_c], [min(1, e + eps) for e in emp_c], step="post",
                        alpha=0.2, color="C0", label="DKW 95% band")
        ax.plot(xc, [1 - (1 - p) ** j for j in xc], label="1-(1-p)^c", color="C1")
        ax.axvline(horizon_c, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("poisoned commitments c (messages + updates built on them)")
        ax.set_title("the same, per auditable commitment")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "attack-matrix.png", dpi=110)
        print(f"wrote {out / 'attack-matrix.png'}")
    except ImportError:
        print("matplotlib missing (pip install -e '.[experiment]'): no plot")
    return summary


# -- main ---------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="write attack-matrix.{md,json,png} here")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--only", action="append", help="run only this behaviour (repeatable; a prefix like forward: works)")
    ap.add_argument("--p", type=float, action="append", help="audit rate(s) (default 0.05 and 1)")
    ap.add_argument("--steps", type=int, default=16, help="steps per run (default 16)")
    ap.add_argument("--rate", type=float, default=0.5, help="attack rate of tensor/protocol attacks (default 0.5)")
    ap.add_argument("--start", type=int, default=2, help="first attacked step (default 2)")
    ap.add_argument("--patient", type=int, default=8, help="start step of the patient attacker (default 8)")
    ap.add_argument("--run-timeout", type=float, default=150.0, help="wall-time bound per run, seconds (default 150)")
    ap.add_argument("--curve", type=int, default=0, help="run N detection-curve trials instead of the matrix")
    ap.add_argument("--curve-rate", type=float, default=0.5, help="attack rate in the curve trials (default 0.5)")
    ap.add_argument("--curve-steps", type=int, default=24, help="steps per curve trial (default 24)")
    ap.add_argument("--skip-unknown", action="store_true",
                    help="skip behaviours this build's node does not know (instead of recording a run error)")
    return ap.parse_args(argv)


def known_behaviours() -> set[str]:
    from node import attacks

    return set(getattr(attacks, "BUILTINS", {}))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    out = args.out
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/attack_matrix.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "steps": args.steps, "rate": args.rate, "start": args.start, "run_timeout": args.run_timeout}
    t0 = time.monotonic()
    if args.curve:
        summary = curve(args, out or Path("."))
        if out is not None:
            path = out / "attack-matrix.json"
            data = json.loads(path.read_text()) if path.exists() else {}
            data["curve"] = summary
            path.write_text(json.dumps(data, indent=1))
            print(f"wrote the curve into {path}")
        return 0
    all_cases = cases(args.rate, args.start, args.patient)
    if args.quick:
        all_cases = [c for c in all_cases if c.name in QUICK]
    if args.only:
        all_cases = [c for c in all_cases if any(c.name == o or c.name.startswith(o) for o in args.only)]
    if args.skip_unknown:
        known = known_behaviours()
        all_cases = [c for c in all_cases if all(b in known for b in [*c.attack.get("behaviours", []),
                                                                      *c.liar.get("behaviours", [])])]
    ps = args.p or [0.05, 1.0]
    clean_losses(args.steps)
    results: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="pipeguard-matrix-"))
    total = len(all_cases) * len(ps)
    try:
        for p in ps:
            for case in all_cases:
                res, _, _ = run_case(case, p, args.steps, args.run_timeout, tmp / f"{len(results)}")
                results.append(asdict(res))
                print(f"[{len(results)}/{total}] {describe(res)}", flush=True)
                if res.honest_banned:
                    print(f"!!! HONEST NODE BANNED in {case.name} p={p}: {res.ban_reasons}", flush=True)
                shutil.rmtree(tmp / f"{len(results) - 1}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta["wall_min"] = (time.monotonic() - t0) / 60
    caught = sum(r["detected"] for r in results)
    print(f"matrix: {caught}/{len(results)} runs detected, honest nodes banned: "
          f"{sum(r['honest_banned'] for r in results)}, {meta['wall_min']:.1f} min")
    if out is not None:
        (out / "attack-matrix.md").write_text(markdown(results, meta))
        path = out / "attack-matrix.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data.update({"meta": meta, "results": results})
        path.write_text(json.dumps(data, indent=1))
        print(f"wrote {out / 'attack-matrix.md'} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
