"""The attack matrix: every built-in behaviour against a small real testnet, defence on.

    python benchmarks/attack_matrix.py --out docs/            # the whole matrix, p = 0.05 and p = 1
    python benchmarks/attack_matrix.py --quick                # a short subset
    python benchmarks/attack_matrix.py --only forward:reverse --p 1
    python benchmarks/attack_matrix.py --curve 40 --out docs/ # the detection curve only (needs matplotlib)
    pipeguard experiment matrix ...                           # the same

Every run is a ``pipeguard.app.testnet.LocalTestnet``: a coordinator and four node daemons on
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
``node_demoted``/``rolled_back``/``stage_assigned``/``stage_skipped`` events (what the system did), evidence
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

from pipeguard.app.runconfig import node_config, run_config, to_toml  # noqa: E402
from pipeguard.app.testnet import LocalTestnet, TestnetError  # noqa: E402
from pipeguard.data import stdlib_corpus  # noqa: E402
from pipeguard.evidence import verify_bundle  # noqa: E402
from pipeguard.model import GPTConfig, OptimSettings  # noqa: E402
from pipeguard.reference import train_reference  # noqa: E402
from pipeguard.v1 import pipeguard_pb2 as pb  # noqa: E402

SEED = 7
MICRO_BATCHES = 4
MICRO_BATCH_SIZE = 4
DATA_BYTES = 262144
GPT = GPTConfig(block_size=32, n_layer=3, n_head=2, n_embd=32)
ATTACKER, STANDBY = 1, 3
"""Node indices: the attacker serves stage 1; the standby (node 3) is the preferred auditor."""

RUN = {
    "model.preset": "tiny", "model.n_layer": GPT.n_layer, "model.n_embd": GPT.n_embd, "model.n_head": GPT.n_head,
    "model.block_size": GPT.block_size,
    "train.micro_batches": MICRO_BATCHES, "train.micro_batch_size": MICRO_BATCH_SIZE, "train.seed": SEED,
    "train.warmup_steps": 2,
    "pipeline.stages": 3, "pipeline.min_nodes": 4,
    "data.max_bytes": DATA_BYTES,
    "audit.checkpoint_every": 4, "audit.retention": 4,
    "timeouts.heartbeat_interval": 0.2, "timeouts.heartbeat_timeout": 3.0, "timeouts.step": 20.0,
}
"""Every run's config (pipeguard.app.runconfig keys); each run adds its steps, audit rate and screen."""

TENSOR_KINDS = ["reverse", "random", "noise", "scale", "zero", "sign-flip", "constant-direction", "stale"]
PROTOCOL = ["wire:bad-signature", "wire:replay", "wire:equivocate", "state:false-commitment", "update:skip",
            "update:poison", "audit:accuse", "audit:clear", "node:silent", "node:slow"]
ESCAPES = ["state:backdoor", "state:off-attestation", "update:swap-after-commit", "forward:switch-attempt",
           "refusal:frame"]
"""Issue 11's attacks on the protocol itself (dodging audits, framing): each runs as a protocol row."""
WITHHOLD = "withhold:reverse"
"""forward:reverse while withholding every audited state (state:withhold): never banned, routed around."""
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
    run: dict = field(default_factory=dict)
    """Changes to ``RUN`` for this case (runconfig keys)."""

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
            if kind == "noise" and direction == "forward":
                out.append(Case(f"{name}(scale=1e-4)", "tensor", {"behaviours": [name], "rate": rate,
                                                                  "start_step": start, "noise_scale": 1e-4},
                                note="noise under the audit tolerance"))
    for name in PROTOCOL:
        if name.startswith("audit:"):
            out.append(Case(name, "protocol", liar={"behaviours": [name], "rate": 1.0}))
        else:
            out.append(Case(name, "protocol", {"behaviours": [name], "rate": rate, "start_step": start}))
    for name in ESCAPES:
        if name == "state:backdoor":  # the start state itself, built once: every time, and the pipeline
            # forms again with the three nodes left after its ban before step 0
            out.append(Case(name, "protocol", {"behaviours": [name], "rate": 1.0, "start_step": 0},
                            run={"pipeline.min_nodes": 3}))
        else:
            out.append(Case(name, "protocol", {"behaviours": [name], "rate": rate, "start_step": start}))
    for name in ("forward:ride", "backward:ride", "update:ride"):
        out.append(Case(name, "tolerance", {"behaviours": [name], "rate": 1.0, "start_step": start, "ride": 0.9},
                        note="0.9x the per-element allowance on every message: within the tolerance by design"))
    out.append(Case("forward:ride(3x)", "tolerance",
                    {"behaviours": ["forward:ride"], "rate": 1.0, "start_step": start, "ride": 3.0},
                    note="3x the per-element allowance"))
    out.append(Case(WITHHOLD, "coordinated", {"behaviours": ["forward:reverse", "state:withhold"], "rate": rate,
                                              "start_step": start},
                    note="reverses and serves nobody the state of a step it has begun"))
    out.append(Case(f"patient:reverse(start={patient})", "coordinated",
                    {"behaviours": ["forward:reverse"], "rate": rate, "start_step": patient},
                    note=f"honest for {patient} steps, then forward:reverse"))
    out.append(Case("collude:reverse+clear", "coordinated",
                    {"behaviours": ["forward:reverse"], "rate": rate, "start_step": start},
                    liar={"behaviours": ["audit:clear"], "rate": 1.0, "accomplices": "ATTACKER"},
                    note="stage 1 reverses; the standby auditor signs PASS for it"))
    out.append(Case("collude:reverse+shield", "coordinated",
                    {"behaviours": ["forward:reverse"], "rate": rate, "start_step": start},
                    liar={"behaviours": ["audit:shield"], "rate": 1.0, "accomplices": "ATTACKER"},
                    note="stage 1 reverses; the standby auditor answers 'incomplete' for it"))
    return out


def node_toml(attack: dict) -> str:
    return to_toml(node_config({f"attack.{k}": v for k, v in attack.items()}))


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
    steps_planned: int = 0
    """The run's train.steps: every row must complete them (one node must not stop the run)."""
    honest_demoted: int = 0
    """Honest nodes never given a stage again (distrusted) by the end of the run."""
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
             overrides: dict | None = None, log_level: str = "", stop_on_ban: bool = False) -> tuple[RunResult, pb.StatusReply | None, LocalTestnet]:
    """One run of ``case``; ``overrides`` (runconfig keys) change ``RUN`` further."""
    res = RunResult(case.name, case.family, p, note=case.note, steps_planned=steps)
    run = run_config(RUN, {"train.steps": steps, "audit.rate": p, "audit.screen": screen}, case.run, overrides or {})
    net = LocalTestnet(workdir, run)
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
                if stop_on_ban:
                    break
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
        res.honest_demoted = sum(1 for n in status.nodes if n.distrusted and n.node_id not in guilty)
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
        for kind, label in (("node_demoted", "demoted"), ("node_set_aside", "set aside"), ("rolled_back", "rollback"),
                            ("stage_skipped", "skip")):
            if kind in kinds:
                res.actions.append(label)
        if any(e.kind == "node_set_aside" and e.node_id not in guilty for e in events):
            res.actions.append("HONEST node set aside")
        if any(e.kind == "stage_assigned" and e.seq > (ban_ev.seq if ban_ev else 0) for e in events) and \
                ("node_offline" in kinds or "node_demoted" in kinds or "node_set_aside" in kinds or bans):
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


def curve_markdown(c: dict) -> str:
    ok = "within" if c["within_error_model"] else "NOT within"
    lines = [
        "", "## Detection curve", "",
        f"![detection curve](attack-matrix.png)", "",
        f"{c['valid_trials']} testnet trials (of {c['trials']} started; the others failed to start or run and are "
        f"left out) of `forward:reverse` at attack rate {c['rate']} on stage 1, audit rate p = {c['p']}, screen "
        f"off (only random audits can catch it), re-checks at their default, {c['micro_batches']} micro-batches, "
        f"at most {c['steps']} steps, each trial with its own attack seed; every trial stops at the ban. "
        f"k = poisoned activations the attacker sent (its own log) in the steps up to and including the step of "
        f"the audit that convicted it. {c['detected']} of {c['valid_trials']} were caught within {c['steps']} "
        f"steps (model: {100 * c['model_p_caught_within_steps']:.1f}%), mean k when caught {c['mean_k']:.1f} "
        f"(model {c['model_mean_k_if_caught']:.1f}); honest nodes banned: {c['honest_banned']}.", "",
        "What the scheduler does (coordinator/audits.py `select`, `select_updates`): each poisoned message is "
        "audited with probability p, and so is each step's update of the attacking stage, which recomputes "
        "every micro-batch of the step. A step with n poisoned messages therefore escapes with probability "
        "(1 - p)^(n + 1): per poisoned *commitment* c (messages + the updates built on them) detection is "
        "exactly 1 - (1 - p)^c at step boundaries, and per poisoned message it is faster than 1 - (1 - p)^k. "
        "The model curve is a Monte Carlo (200,000 runs) of exactly that, with the same micro-batches, rate "
        "and step bound.", "",
        "| comparison | KS distance (max \|ECDF - F\|) | DKW 95% bound | verdict |",
        "|---|---|---|---|",
        f"| poisoned messages k vs scheduler model | {c['ks_messages_vs_model']:.3f} | {c['dkw_eps_95']:.3f} | "
        f"{'within' if c['ks_messages_vs_model'] <= c['dkw_eps_95'] else 'outside'} |",
        f"| poisoned commitments c vs scheduler model (= 1-(1-p)^c at step ends) | "
        f"{c['ks_commitments_vs_model']:.3f} | {c['dkw_eps_95']:.3f} | "
        f"{'within' if c['ks_commitments_vs_model'] <= c['dkw_eps_95'] else 'outside'} |",
        f"| poisoned messages k vs plain 1-(1-p)^k | {c['ks_messages_vs_naive_1_minus_(1-p)^k']:.3f} | "
        f"{c['dkw_eps_95']:.3f} | {'within' if c['within_error_naive'] else 'outside'} |", "",
        f"The measured curve is **{ok} statistical error** of the scheduler's model (DKW: with 95% probability "
        f"the true CDF lies within ±{c['dkw_eps_95']:.3f} of the empirical one everywhere; the bound is "
        f"conservative for a discrete distribution). With {c['valid_trials']} trials the band is wide: this "
        f"rules out gross departures (a scheduler that audited per step instead of per message, or an "
        f"auditor-choice bias), not differences of a few percent.",
    ]
    return "\n".join(lines) + "\n"


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Attack matrix",
        "",
        f"Generated by `{meta['command']}` on {meta['when']} ({meta['machine']}); {meta['wall_min']:.1f} min.",
        f"Testnet: 3 stages of the tiny GPT + 1 standby, {MICRO_BATCHES} micro-batches x {MICRO_BATCH_SIZE}, "
        f"{meta['steps']} steps, screen on; attacker = stage 1's node (lying auditors: the standby); "
        f"tensor/protocol attacks at rate {meta['rate']} from step {meta['start']}. Each run bounded by "
        f"{meta['run_timeout']:.0f} s. See the script's docstring for how each column is measured.",
        *([f"Rerun since: {meta['reruns']}."] if meta.get("reruns") else []),
        "",
        "| behaviour | p | detected | steps until ban (audited step) | audits (at ban / run) | honest banned | "
        "honest demoted | steps completed / planned | final loss vs clean | system did | evidence |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
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
        elif "demoted" in r["actions"]:
            det += " (routed around: demoted, no ban)"
        planned = r.get("steps_planned") or meta["steps"]
        lines.append(f"| {r['behaviour']} | {r['p']:g} | {det} | {steps} | {at} / {r['audits_total']} | "
                     f"{r['honest_banned']} | {r.get('honest_demoted', '-')} | {r['steps_done']} / {planned} | "
                     f"{loss} | {', '.join(r['actions'])} | {ev} |")
    caught = sum(r["detected"] for r in results)
    short = [r for r in results if r["steps_done"] < (r.get("steps_planned") or meta["steps"])]
    listed = " (" + ", ".join(f"{r['behaviour']} p={r['p']:g}" for r in short) + ")" if short else ""
    lines += ["", f"{caught} of {len(results)} runs caught the attacker; honest nodes banned in all runs: "
              f"{sum(r['honest_banned'] for r in results)}; runs that did not complete their planned steps: "
              f"{len(short)}{listed}. Why the rows that are not caught are not, and what "
              "would catch them: [threat-model.md](threat-model.md) §6."]
    return "\n".join(lines) + "\n"


# -- detection curve ------------------------------------------------------------------------------


FIRED = re.compile(r"attack \S+ fired on (forward|backward) step (\d+) mb (\d+)")
AUDIT_STEP = re.compile(r"(forward|backward|update) audit at step (\d+)")


def curve_trial(i: int, p: float, rate: float, steps: int, timeout: float, workdir: Path) -> dict:
    case = Case("forward:reverse", "tensor", {"behaviours": ["forward:reverse"], "rate": rate, "start_step": 0,
                                              "seed": 1000 + i})
    res, status, net = run_case(case, p, steps, timeout, workdir, screen=False, log_level="DEBUG", stop_on_ban=True)
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


def simulate(p: float, rate: float, steps: int, trials: int = 200_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo of what the scheduler does to this attacker: each (step, micro-batch) forward
    message is poisoned with probability ``rate``; each message is audited with probability p,
    and so is each step's update (which recomputes every micro-batch of the step). Returns the
    poisoned messages K and poisoned commitments C (messages + poisoned steps) up to and
    including the first step with an audited poisoned commitment; a large sentinel if none
    within ``steps``."""
    g = torch.Generator().manual_seed(seed)
    poisoned = torch.rand((trials, steps, MICRO_BATCHES), generator=g) < rate
    audited = torch.rand((trials, steps, MICRO_BATCHES), generator=g) < p
    update = torch.rand((trials, steps), generator=g) < p
    any_poisoned = poisoned.any(dim=2)
    caught = (poisoned & audited).any(dim=2) | (any_poisoned & update)  # (trials, steps)
    n = poisoned.sum(dim=2)
    k_cum = n.cumsum(dim=1)
    c_cum = (n + any_poisoned.long()).cumsum(dim=1)
    first = torch.where(caught.any(dim=1), caught.float().argmax(dim=1), torch.full((trials,), -1))
    never = 10 ** 9
    idx = first.clamp(min=0).unsqueeze(1)
    K = torch.where(first >= 0, k_cum.gather(1, idx).squeeze(1), torch.full((trials,), never))
    C = torch.where(first >= 0, c_cum.gather(1, idx).squeeze(1), torch.full((trials,), never))
    return K, C


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
    return summarise(results, p, rate, steps, trials, out, (time.monotonic() - t0) / 60)


def summarise(results: list[dict], p: float, rate: float, steps: int, trials: int, out: Path,
              wall_min: float) -> dict:
    """The curve's statistics and plot from the trials' records (also used by ``--render``)."""
    valid = [r for r in results if not r["error"] and (r["k"] is not None or not r["detected"])]
    n = len(valid)
    ks = sorted(r["k"] for r in valid if r["k"] is not None)
    cs = sorted(r["c"] for r in valid if r["c"] is not None)
    eps = math.sqrt(math.log(2 / 0.05) / (2 * max(n, 1)))  # DKW, 95%
    K, C = simulate(p, rate, steps)
    kmax = steps * MICRO_BATCHES
    cmax = steps * (MICRO_BATCHES + 1)

    def ecdf(xs: list[int], j: int) -> float:  # trials never caught count as "not yet" everywhere
        return sum(1 for x in xs if x <= j) / max(n, 1)

    model_k = [float((K <= j).double().mean()) for j in range(kmax + 1)]
    model_c = [float((C <= j).double().mean()) for j in range(cmax + 1)]
    naive = [1 - (1 - p) ** j for j in range(kmax + 1)]
    d_k = max(abs(ecdf(ks, j) - model_k[j]) for j in range(kmax + 1))
    d_c = max(abs(ecdf(cs, j) - model_c[j]) for j in range(cmax + 1))
    d_naive = max(abs(ecdf(ks, j) - naive[j]) for j in range(kmax + 1))
    # At the step boundaries the commitments model is exactly 1-(1-p)^c; how far apart are they?
    formula_gap = max(abs(model_c[j] - (1 - (1 - p) ** j)) for j in sorted(set(cs)) or [0])
    summary = {
        "p": p, "rate": rate, "trials": trials, "valid_trials": n, "detected": len(ks), "steps": steps,
        "micro_batches": MICRO_BATCHES, "honest_banned": sum(r["honest_banned"] for r in valid),
        "dkw_eps_95": eps, "ks_messages_vs_model": d_k, "ks_commitments_vs_model": d_c,
        "ks_messages_vs_naive_1_minus_(1-p)^k": d_naive, "model_vs_formula_at_observed_c": formula_gap,
        "within_error_model": d_k <= eps and d_c <= eps, "within_error_naive": d_naive <= eps,
        "mean_k": (sum(ks) / len(ks)) if ks else None,
        "model_mean_k_if_caught": float(K[K < 10 ** 9].double().mean()),
        "model_p_caught_within_steps": float((K < 10 ** 9).double().mean()),
        "wall_min": wall_min, "trials_detail": results,
    }
    print(f"curve: {len(ks)}/{n} detected within {steps} steps (model {summary['model_p_caught_within_steps']:.3f}); "
          f"DKW eps {eps:.3f}; KS vs scheduler model: messages {d_k:.3f}, commitments {d_c:.3f}; "
          f"vs plain 1-(1-p)^k {d_naive:.3f}", flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, xs_obs, model, top, label, var in (
                (axes[0], ks, model_k, kmax, "poisoned messages sent (k)", "k"),
                (axes[1], cs, model_c, cmax, "poisoned commitments c (messages + updates built on them)", "c")):
            top = min(top, 80)
            xs = list(range(top + 1))
            emp = [ecdf(xs_obs, j) for j in xs]
            ax.step(xs, emp, where="post", label=f"measured ({n} testnet trials)", color="C0")
            ax.fill_between(xs, [max(0, e - eps) for e in emp], [min(1, e + eps) for e in emp], step="post",
                            alpha=0.2, color="C0", label="DKW 95% band")
            ax.step(xs, model[: top + 1], where="post", label="scheduler model (simulated)", color="C1")
            ax.plot(xs, [1 - (1 - p) ** j for j in xs], label=f"1-(1-p)^{var}", color="C2", ls="--")
            ax.set_xlabel(label)
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=8, loc="lower right")
        axes[0].set_ylabel("P(caught by then)")
        axes[0].set_title(f"forward:reverse r={rate}, p={p}, screen off, {MICRO_BATCHES} micro-batches")
        axes[1].set_title("per auditable commitment")
        fig.tight_layout()
        fig.savefig(out / "attack-matrix.png", dpi=110)
        print(f"wrote {out / 'attack-matrix.png'}")
    except ImportError:
        print("matplotlib missing (pip install -e '.[experiment]'): no plot")
    return summary


# -- main ---------------------------------------------------------------------------------------------


def write_markdown(out: Path, data: dict) -> None:
    text = markdown(data["results"], data["meta"]) if "results" in data else "# Attack matrix\n"
    if "curve" in data:
        text += curve_markdown(data["curve"])
    (out / "attack-matrix.md").write_text(text)


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
    ap.add_argument("--render", action="store_true",
                    help="only rewrite attack-matrix.md from --out's attack-matrix.json (matrix and curve)")
    ap.add_argument("--skip-unknown", action="store_true",
                    help="skip behaviours this build's node does not know (instead of recording a run error)")
    ap.add_argument("--merge", action="store_true",
                    help="with --out: replace only the rows run now (same behaviour and p) in the existing "
                         "attack-matrix.json, add new ones, and note the rerun in the header")
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
    if args.render:
        path = out / "attack-matrix.json"
        data = json.loads(path.read_text())
        if "curve" in data:  # recompute the statistics and redraw the plot from the trials' records
            c = data["curve"]
            data["curve"] = summarise(c["trials_detail"], c["p"], c["rate"], c["steps"], c["trials"], out,
                                      c["wall_min"])
            path.write_text(json.dumps(data, indent=1))
        write_markdown(out, data)
        return 0
    if args.curve:
        summary = curve(args, out or Path("."))
        if out is not None:
            path = out / "attack-matrix.json"
            data = json.loads(path.read_text()) if path.exists() else {}
            data["curve"] = summary
            path.write_text(json.dumps(data, indent=1))
            print(f"wrote the curve into {path}")
            write_markdown(out, data)
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
        path = out / "attack-matrix.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        if args.merge and data.get("results"):
            fresh = {(r["behaviour"], r["p"]): r for r in results}
            kept = [fresh.pop((r["behaviour"], r["p"]), r) for r in data["results"]]
            data["results"] = kept + list(fresh.values())
            old = data.get("meta", meta)
            note = f"{len(results)} rows rerun on {meta['when']}: {meta['command']} ({meta['wall_min']:.1f} min)"
            old["reruns"] = "; ".join(x for x in (old.get("reruns"), note) if x)
            data["meta"] = old
        else:
            data.update({"meta": meta, "results": results})
        path.write_text(json.dumps(data, indent=1))
        write_markdown(out, data)
        print(f"wrote {out / 'attack-matrix.md'} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
