"""Daemon configs for local runs (the demo, tests, benchmarks), built from the config dataclasses.

    cfg = run_config({"train.steps": 4, "audit.rate": 1.0})    # a CoordinatorConfig
    cfg = replace(cfg, {"pipeline.min_nodes": 4})              # the same, one key changed
    LocalTestnet(workdir, cfg)                                  # writes to_toml(cfg) as run.toml
    path.write_text(to_toml(node_config({"attack.behaviours": ["forward:reverse"]})))

Overrides are dotted keys (``section.field``, or a top-level field such as ``run_id``), given as
mappings and keyword arguments and applied in order over the dataclass defaults. A key that names
no field is a ``ConfigError`` that lists the valid ones; values go through the daemons' own loader
(``pipeguard.config.load``), so they are checked exactly as a TOML file's would be. ``to_toml``
writes only what differs from the defaults; a daemon reading it builds the same config.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any, Mapping, TypeVar

from coordinator.config import CoordinatorConfig
from node.config import NodeConfig
from pipeguard import config as pgconfig
from pipeguard.config import ConfigError

T = TypeVar("T")


def flatten(cfg: Any) -> dict[str, Any]:
    """Every leaf field of a config as ``{"section.field": value}`` (top-level fields undotted)."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in flatten(value).items()})
        else:
            out[f.name] = value
    return out


def build(cls: type[T], *layers: Mapping[str, Any], **overrides: Any) -> T:
    """``cls`` from its defaults with each mapping of dotted keys applied in turn, then ``overrides``."""
    valid = flatten(cls())
    values: dict[str, Any] = {}
    for layer in (*layers, overrides):
        unknown = sorted(k for k in layer if k not in valid)
        if unknown:
            sections = {k.partition(".")[0] for k in unknown}
            near = sorted(k for k in valid if k.partition(".")[0] in sections) or sorted(valid)
            raise ConfigError(f"unknown {cls.__name__} key(s) {unknown}; valid keys: {near}")
        unset = sorted(k for k, v in layer.items() if v is None)
        if unset:
            raise ConfigError(f"{cls.__name__} key(s) {unset} given None; give a value or leave the key out")
        values.update(layer)
    return pgconfig.load(cls, cli=values, environ={})


def run_config(*layers: Mapping[str, Any], **overrides: Any) -> CoordinatorConfig:
    """A coordinator's run config: ``build(CoordinatorConfig, ...)``."""
    return build(CoordinatorConfig, *layers, **overrides)


def node_config(*layers: Mapping[str, Any], **overrides: Any) -> NodeConfig:
    """A node's config: ``build(NodeConfig, ...)``."""
    return build(NodeConfig, *layers, **overrides)


def replace(cfg: T, *layers: Mapping[str, Any], **overrides: Any) -> T:
    """``cfg`` with dotted keys changed (checked as ``build`` checks them)."""
    return build(type(cfg), flatten(cfg), *layers, **overrides)


def to_toml(cfg: Any) -> str:
    """The TOML file a daemon reads back to ``cfg``: the fields that differ from the defaults."""
    default = flatten(type(cfg)())
    changed = {k for k, v in flatten(cfg).items() if default[k] != v}
    # pipeguard.config.to_toml renders every field, one "key = value" line each, a [section] per table.
    rendered: dict[str, str] = {}
    section = ""
    for line in pgconfig.to_toml(cfg).splitlines():
        if line.startswith("["):
            section = line.strip("[]") + "."
        elif " = " in line:
            rendered[section + line.partition(" = ")[0]] = line
    top = [rendered[k] for k in rendered if k in changed and "." not in k]
    tables: dict[str, list[str]] = {}
    for k in rendered:
        if k in changed and "." in k:
            tables.setdefault(k.partition(".")[0], []).append(rendered[k])
    blocks = ["\n".join(top)] if top else []
    blocks += [f"[{name}]\n" + "\n".join(lines) for name, lines in tables.items()]
    return "\n\n".join(blocks) + "\n" if blocks else ""
