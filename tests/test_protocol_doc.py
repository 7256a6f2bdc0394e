"""docs/protocol.md stays true: it names every signed message with every field its signature
binds, every message signed as part of another, every claim rule and every evidence-bundle kind.

The test walks the schema (the generated descriptors of pipeguard.proto), pipeguard/claims.py and
pipeguard/evidence.py, so adding a field to a signed message, a rule or a bundle kind without
saying here what it binds and proves fails the suite.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from pipeguard import claims
from pipeguard.v1 import pipeguard_pb2 as pb

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "protocol.md").read_text()
CARRIES_ANOTHER_SIGNATURE = {"TensorChunk"}
"""Messages with a ``signature`` field that is another message's signature (said in §2)."""


def _section(number: int) -> str:
    m = re.search(rf"^## {number}\. .*?(?=^## \d+\. |\Z)", DOC, re.S | re.M)
    assert m, f"docs/protocol.md has no section {number}"
    return m.group(0)


def _rows(section: str) -> dict[str, list[str]]:
    """First cell -> cells, for the table rows of a section (header and rule rows left out)."""
    rows = {}
    for line in section.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells
    rows.pop(next(iter(rows)))  # the header row
    return rows


def _ticked(text: str) -> set[str]:
    return set(re.findall(r"`([A-Za-z_][A-Za-z0-9_.]*)`", text))


def _fields(d: Descriptor) -> set[str]:
    return {f.name for f in d.fields if f.name != "signature"}


SIGNED = {name: d for name, d in pb.DESCRIPTOR.message_types_by_name.items()
          if "signature" in d.fields_by_name and name not in CARRIES_ANOTHER_SIGNATURE}


def _embedded() -> set[str]:
    """Message types reached through the fields of signed messages (nested, not signed on their own)."""
    seen, todo = set(), list(SIGNED.values())
    while todo:
        d = todo.pop()
        for f in d.fields:
            if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.name not in seen:
                seen.add(f.message_type.name)
                todo.append(f.message_type)
    return seen - set(SIGNED)


def test_every_signed_message_is_a_row_of_section_2():
    rows = _rows(_section(2))
    assert set(rows) == set(SIGNED), (f"missing: {sorted(set(SIGNED) - set(rows))}, "
                                      f"not signed: {sorted(set(rows) - set(SIGNED))}")


@pytest.mark.parametrize("name", sorted(SIGNED))
def test_each_row_names_every_field_the_signature_binds(name):
    binds = _ticked(_rows(_section(2))[name][2])
    missing = _fields(SIGNED[name]) - binds
    assert not missing, f"{name}: its signature binds {sorted(missing)}, which docs/protocol.md §2 does not name"


def test_every_message_signed_as_part_of_another_is_in_section_3_with_its_fields():
    rows = _rows(_section(3))
    named = {m.strip() for key in rows for m in key.split(",")}
    for name in _embedded():
        assert name in named, f"{name} is signed inside another message; add it to docs/protocol.md §3"
        d = pb.DESCRIPTOR.message_types_by_name[name]
        if name in rows and name not in SIGNED:
            missing = _fields(d) - _ticked(rows[name][2])
            assert not missing, f"{name}: §3 does not name {sorted(missing)}"


def test_every_claim_rule_is_named_and_every_named_rule_exists():
    rules = {n for n, f in inspect.getmembers(claims, inspect.isfunction)
             if f.__module__ == claims.__name__ and not n.startswith("_")}
    mentioned = set(re.findall(r"`claims\.([a-z_]+)`", DOC))
    assert rules - mentioned == set(), f"claim rules docs/protocol.md does not name: {sorted(rules - mentioned)}"
    assert mentioned - rules == set(), f"docs/protocol.md names rules claims.py lacks: {sorted(mentioned - rules)}"


def test_every_bundle_kind_is_a_row_of_section_4():
    source = (ROOT / "pipeguard" / "evidence.py").read_text()
    kinds = set(re.findall(r'kind == "([a-z-]+)"', source))
    for group in re.findall(r"kind in \(([^)]*)\)", source):
        kinds |= set(re.findall(r'"([a-z-]+)"', group))
    kinds |= set(re.findall(r'"kind": "([a-z-]+)"', source))
    assert {"audit", "equivocation"} <= kinds, "the walker no longer finds the kinds in evidence.py"
    rows = {k.strip("`") for k in _rows(_section(4))}
    assert kinds - rows == set(), f"bundle kinds docs/protocol.md §4 lacks: {sorted(kinds - rows)}"


def _status_api_types() -> set[str]:
    """Messages and enums a Status or Watch client reads or writes (the pipeguard.v1 ones)."""
    service = pb.DESCRIPTOR.services_by_name["Coordinator"]
    todo = [service.methods_by_name[m].input_type for m in ("Status", "Watch")]
    todo += [service.methods_by_name[m].output_type for m in ("Status", "Watch")]
    seen: set[str] = set()
    while todo:
        d = todo.pop()
        if d.name in seen:
            continue
        seen.add(d.name)
        for f in d.fields:
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                todo.append(f.message_type)
            elif f.type == FieldDescriptor.TYPE_ENUM and f.enum_type.name == "EventKind":
                seen.add("EventKind")  # the other enums (Role, RunPhase) are named by their fields
    return seen


def test_the_status_api_section_names_every_message_of_status_and_watch():
    rows = set(_rows(_section(6)))
    assert _status_api_types() - rows == set(), \
        f"Status/Watch types docs/protocol.md §6 lacks: {sorted(_status_api_types() - rows)}"
