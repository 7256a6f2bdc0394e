"""Attacks live at seams: the honest path has no attack call sites, an honest daemon no wrapper.

The honest node's modules are checked by their syntax tree (names, attributes, imports and
function names; docstrings and comments may mention attacks), and ``node.daemon.build`` is
run for an honest and for malicious configs to see which parts it wraps.
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from pipeguard.app.runconfig import node_config
from pipeguard.computation import StageComputation
from pipeguard.identity import Identity
from node import daemon, seams
from node.auditor import VerdictSigner
from node.peers import PeerPool
from node.service import NodeService

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
HONEST = ["node/stage.py", "node/schedule.py", "node/admission.py", "node/retention.py", "node/service.py",
          "node/auditor.py", "node/membership.py", "node/peers.py", "node/screen.py"]
WORDS = ("behaviour", "attack", "seams")


def attack_names(source: str) -> list[str]:
    """Identifiers in ``source``'s code (not its strings) that name behaviours, attacks or seams."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.arg):
            names = [node.arg]
        elif isinstance(node, ast.alias):
            names = [node.name, node.asname or ""]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        found += [f"line {node.lineno}: {n}" for n in names if any(w in n.lower() for w in WORDS)]
    return found


@pytest.mark.parametrize("path", HONEST)
def test_honest_modules_have_no_attack_call_sites(path):
    assert attack_names((ROOT / path).read_text()) == [], f"{path} reaches for a behaviour; use a seam (node/seams.py)"


def test_the_checker_sees_a_call_site():
    source = "from node.attacks import AttackContext\ndef f(self):\n    self.behaviour.on_forward(ctx, x)\n"
    assert len(attack_names(source)) == 3
    assert attack_names('"""Mentions attacks and behaviour in a docstring."""\n# attack\n') == []


async def _build(tmp_path, overrides):
    cfg = node_config({"home": str(tmp_path), **overrides})
    node = daemon.build(cfg, Identity.generate(), tmp_path)
    try:
        return node, node.service.auditor.signer
    finally:
        node.runtime.close()
        await node.membership.close()


def test_an_honest_daemon_builds_no_wrapper(tmp_path):
    node, signer = asyncio.run(_build(tmp_path, {}))
    assert node.seams is None
    assert type(node.runtime.peers) is PeerPool and node.runtime.peers is node.peers
    assert node.runtime.build == StageComputation.build
    assert type(node.service) is NodeService
    assert type(signer) is VerdictSigner
    assert node.membership.before_heartbeat is None


@pytest.mark.parametrize("attack, wrapped", [
    ("forward:reverse", {"computation"}),
    ("update:skip", {"computation"}),
    ("wire:replay", {"peers"}),
    ("state:false-commitment", {"service"}),
    ("wire:equivocate", {"service"}),
    ("audit:accuse", {"signer"}),
    ("node:silent", {"peers", "service", "heartbeat"}),
    ("node:slow", {"peers", "service", "heartbeat"}),
])
def test_a_malicious_daemon_wraps_only_the_seams_its_hooks_need(tmp_path, attack, wrapped):
    node, signer = asyncio.run(_build(tmp_path, {"attack.behaviours": [attack]}))
    got = {name for name, on in [
        ("computation", node.runtime.build != StageComputation.build),
        ("peers", isinstance(node.runtime.peers, seams.TamperedPeers)),
        ("service", isinstance(node.service, seams.TamperedService)),
        ("signer", isinstance(signer, seams.LyingSigner)),
        ("heartbeat", node.membership.before_heartbeat is not None),
    ] if on}
    assert got == wrapped
