"""Fuzz both daemons' RPC handlers through their real gRPC servers and print what happened.

    .venv/bin/python benchmarks/fuzz.py                     # 67 faults x 40 cases, ~1-2 minutes
    .venv/bin/python benchmarks/fuzz.py --per-fault 200     # more cases
    .venv/bin/python benchmarks/fuzz.py --target node --fault PUSH_TRUNCATED --per-fault 50

Every named fault of ``tests/hostile.py`` (28 against the coordinator, 40 against a middle-stage
node) gets ``--per-fault`` cases, their parameters drawn by hypothesis (seeded: ``--seed``). Each
case goes to a real server on loopback with real signatures and is checked as in the tests: the
status its fault maps to (never UNKNOWN/INTERNAL), the run's state unchanged, the server still
serving, and the process's peak RSS growth over the case (the kernel's high-water mark, reset
before each case; the servers run in this process). A table shows, per fault: cases run, the
statuses seen, failures and the largest peak-RSS growth of one case. Exit status 1 if any case
failed. Faults without parameters (e.g. a banned node registering) repeat the same case.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from tests import hostile  # noqa: E402


def draw_cases(strategy, n: int, rng_seed: int) -> list[hostile.Case]:
    """``n`` cases from ``strategy`` (fewer distinct ones if it has fewer; then repeated)."""
    drawn: list[hostile.Case] = []

    @seed(rng_seed)
    @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(case):
        drawn.append(case)

    collect()
    drawn = drawn[:n] or []
    while drawn and len(drawn) < n:
        drawn.extend(drawn[: n - len(drawn)])
    return drawn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-fault", type=int, default=40, help="cases per named fault (default 40)")
    p.add_argument("--target", choices=sorted(hostile.TARGETS), action="append",
                   help="fuzz only this daemon (repeatable; default both)")
    p.add_argument("--fault", action="append", help="only this fault name (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--show", type=int, default=3, help="failure messages shown per fault (default 3)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)  # every refusal is logged as a warning: thousands of lines

    rows, total_failed, started = [], 0, time.monotonic()
    peak_process = 0
    for name in args.target or sorted(hostile.TARGETS):
        cls, strategies = hostile.TARGETS[name]
        faults = {f: s for f, s in strategies().items() if not args.fault or f.name in args.fault}
        if not faults:
            continue
        with tempfile.TemporaryDirectory(prefix=f"pipeguard-fuzz-{name}-") as home:
            harness = hostile.Harness(cls, Path(home))
            try:
                for fault, strategy in faults.items():
                    cases = draw_cases(strategy, args.per_fault, args.seed)
                    codes: collections.Counter[str] = collections.Counter()
                    failures: list[str] = []
                    growth, t0 = 0, time.monotonic()
                    for case in cases:
                        result = harness.run_case(case)
                        codes[result.code.name] += 1
                        growth = max(growth, result.peak_rss_growth)
                        peak_process = max(peak_process, hostile.peak_rss())
                        if result.failures:
                            failures.append(f"{case!r}: {'; '.join(result.failures)}")
                    total_failed += len(failures)
                    rows.append({"target": name, "fault": fault.name, "expected": harness.target.expected[fault].name,
                                 "cases": len(cases), "statuses": dict(codes), "failures": len(failures),
                                 "failure_examples": failures[: args.show], "peak_rss_growth_mib": growth / 2**20,
                                 "seconds": time.monotonic() - t0})
                    print(f"  {name:<11} {fault.name:<30} {len(cases):>5} cases  {len(failures)} failed",
                          file=sys.stderr, flush=True)
            finally:
                harness.close()

    print()
    print(f"{'target':<11} {'fault':<30} {'cases':>6}  {'statuses seen':<34} {'fail':>4} {'peak RSS +MiB':>13}")
    for r in rows:
        statuses = ", ".join(f"{k} x{v}" for k, v in sorted(r["statuses"].items()))
        print(f"{r['target']:<11} {r['fault']:<30} {r['cases']:>6}  {statuses:<34} {r['failures']:>4} "
              f"{r['peak_rss_growth_mib']:>13.1f}")
    cases = sum(r["cases"] for r in rows)
    by_target = collections.Counter()
    for r in rows:
        by_target[r["target"]] += r["cases"]
    print()
    print(f"{cases} cases ({', '.join(f'{t}: {n}' for t, n in sorted(by_target.items()))}) in "
          f"{time.monotonic() - started:.0f} s; {total_failed} failed; largest peak-RSS growth of one case "
          f"{max((r['peak_rss_growth_mib'] for r in rows), default=0):.1f} MiB; process peak RSS "
          f"{peak_process / 2**20:.0f} MiB")
    for r in rows:
        for example in r["failure_examples"]:
            print(f"FAILED {r['target']} {r['fault']}: {example}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "per_fault": args.per_fault, "rows": rows,
                                               "cases": cases, "failed": total_failed,
                                               "process_peak_rss_mib": peak_process / 2**20}, indent=1))
    return 1 if total_failed else 0


if __name__ == "__main__":
    sys.exit(main())
