"""Configuration: nested dataclasses, one loader that merges TOML file, environment and CLI.

Precedence, lowest first: field defaults, the TOML file, environment variables
(``PIPEGUARD_<SECTION>_<FIELD>``, e.g. ``PIPEGUARD_TRAIN_STEPS=50``; top-level fields are
``PIPEGUARD_<FIELD>``), then CLI flags. Unknown keys are errors that list the valid ones.
Each dataclass checks itself in ``__post_init__`` and says how to fix what is wrong.

The sections both daemons share (network limits and timeouts) live here; each daemon's
top-level config lives in its own package.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, TypeVar

if TYPE_CHECKING:
    import argparse

T = TypeVar("T")

MiB = 1024 * 1024


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message says how to fix it."""


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    # ASCII digits only: str.isdigit() also takes "²" (which int() refuses) and "٣" (which it takes)
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} must be HOST:PORT (e.g. 127.0.0.1:7000), got {value!r}")
    return host.strip("[]"), int(port)


@dataclass
class NetConfig:
    bind: str = "127.0.0.1:0"
    """Address the gRPC server binds (HOST:PORT; port 0 picks a free port)."""
    advertise: str = ""
    """Address other daemons use to reach this one; empty means the bound address. Set it when
    binding 0.0.0.0 or behind NAT/Docker (e.g. ``node3.example.org:7001``)."""
    max_message_bytes: int = 4 * MiB
    """Largest single gRPC message accepted or sent. Must exceed chunk_bytes."""
    chunk_bytes: int = 1 * MiB
    """Payload bytes per tensor stream chunk (~1 MiB is the measured sweet spot)."""
    max_tensor_bytes: int = 1024 * MiB
    """Largest tensor a daemon accepts; a larger claimed size is refused before allocating. A state
    transfer is bounded by max_state_bytes and max_state_tensors."""
    max_inflight_streams: int = 16
    """Tensor streams a node receives at once: half of them (at least one) per neighbour, taken only
    once the stream's header signature verified, so streams naming a neighbour without its key never
    hold one. One more is refused at once with RESOURCE_EXHAUSTED, marked momentary so the sender
    backs off and retries, instead of buffering it. A sender opens at most half as many (at least
    one) to one peer, so two neighbours with the same setting do not hit it."""
    tls_cert: str = ""
    """PEM certificate (chain) of this daemon. With tls_key its gRPC server speaks TLS only, and its
    outgoing calls present it to servers that ask for a client certificate (mutual TLS)."""
    tls_key: str = ""
    """PEM private key of tls_cert (keep it 0600)."""
    tls_ca: str = ""
    """PEM bundle of the CA(s) peers' certificates must chain to. Outgoing calls use TLS and check the
    server against it; with tls_require_client_cert the server checks clients against it too. Empty with
    tls_cert set: outgoing calls use TLS checked against the system's roots."""
    tls_require_client_cert: bool = False
    """Mutual TLS: the server refuses clients without a certificate signed by tls_ca (needs tls_cert,
    tls_key and tls_ca)."""
    metrics_port: int = 0
    """HTTP port serving Prometheus metrics at /metrics, on net.bind's host; 0 = off."""
    drain_bytes: int = 64 * MiB
    """Bytes a server reads and discards from a client stream it answers early (a refused push),
    so that its status reaches the client instead of a torn-down stream; past this (or
    timeouts.drain) it answers at once."""

    peer_stream_slots: int = 0
    """Tensor streams a node opens to one peer at once; 0 = half of max_inflight_streams (at least one),
    so that a receiver's two neighbours together stay within its budget."""
    max_state_tensors: int = 10_000
    """Most tensors one state transfer (checkpoint, audit fetch, hand-over) may carry."""
    max_state_bytes: int = 0
    """Most payload bytes one state transfer may carry; 0 = 64 times max_tensor_bytes."""

    def __post_init__(self) -> None:
        parse_hostport(self.bind, "net.bind")
        if self.advertise:
            parse_hostport(self.advertise, "net.advertise")
        if self.chunk_bytes < 1024:
            raise ConfigError("net.chunk_bytes must be at least 1024")
        if self.max_message_bytes < self.chunk_bytes + 64 * 1024:
            raise ConfigError(
                f"net.max_message_bytes ({self.max_message_bytes}) must exceed net.chunk_bytes "
                f"({self.chunk_bytes}) by at least 64 KiB of headroom"
            )
        if self.max_tensor_bytes < 1:
            raise ConfigError("net.max_tensor_bytes must be positive")
        if self.peer_stream_slots < 0:
            raise ConfigError(f"net.peer_stream_slots must be >= 0 (0 = half of net.max_inflight_streams), "
                              f"got {self.peer_stream_slots}")
        if self.max_state_tensors < 1 or self.max_state_bytes < 0:
            raise ConfigError(f"net.max_state_tensors must be >= 1 and net.max_state_bytes >= 0 (0 = 64 x "
                              f"net.max_tensor_bytes), got {self.max_state_tensors} and {self.max_state_bytes}")
        if self.drain_bytes < 0:
            raise ConfigError(f"net.drain_bytes must be >= 0, got {self.drain_bytes}")
        if self.max_inflight_streams < 1:
            raise ConfigError(f"net.max_inflight_streams must be at least 1, got {self.max_inflight_streams}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("net.tls_cert and net.tls_key go together: set both (this daemon's certificate and "
                              "its private key, e.g. --tls-cert node.pem --tls-key node.key) or neither")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path and not Path(path).expanduser().is_file():
                raise ConfigError(f"net.{name}: no such file {path!r}")
        if self.tls_require_client_cert and not (self.tls_cert and self.tls_ca):
            raise ConfigError("net.tls_require_client_cert needs net.tls_cert, net.tls_key (this server's certificate) "
                              "and net.tls_ca (the CA client certificates must chain to)")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"net.metrics_port must be a TCP port (1-65535) or 0 for off, got {self.metrics_port}")

    @property
    def tls(self) -> bool:
        """Whether outgoing calls use TLS (a CA bundle or a certificate of our own is configured)."""
        return bool(self.tls_ca or self.tls_cert)

    @property
    def stream_slots_per_peer(self) -> int:
        """``peer_stream_slots`` resolved (0 means half of ``max_inflight_streams``, at least one)."""
        return self.peer_stream_slots or max(1, self.max_inflight_streams // 2)

    @property
    def state_bytes_limit(self) -> int:
        """``max_state_bytes`` resolved (0 means 64 times ``max_tensor_bytes``)."""
        return self.max_state_bytes or 64 * self.max_tensor_bytes

    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]


@dataclass
class TimeoutConfig:
    connect: float = 10.0
    """Seconds a node waits for its channel to the coordinator to become ready before it registers
    (then it retries after the backoff)."""
    request: float = 30.0
    """Deadline of an ordinary RPC (register, heartbeat, status, one tensor push) and of receiving one
    tensor stream."""
    step: float = 300.0
    """Deadline of one training step on a stage (forward + backward of all micro-batches), and of the
    calls that wait for one or move a stage's state (assign, apply-update, state and tensor fetches)."""
    audit: float = 0.0
    """Deadline in seconds of an Audit call, and of each fetch an auditor (or the coordinator's judge,
    confirming or re-checking a verdict) makes for it. 0 = sized per audit: timeouts.request, plus the
    bytes it moves (the audited stage's state and tensors) at timeouts.link_mbit, plus 8 x the compute
    seconds the audited stage reported for the step (at most timeouts.step), for it and each audit
    queued before it at the auditor. An auditor that misses it costs no penalty: the coordinator
    audits itself. A node's auditor bounds its fetches by what is left of the coordinator's deadline."""
    abort_wait: float = 2.0
    """Seconds an aborted step may take to stop running before the abort is refused."""
    heartbeat_interval: float = 1.0
    """Seconds between a node's heartbeats."""
    heartbeat_timeout: float = 10.0
    """A node with no heartbeat for this long is marked offline."""
    retry_backoff: float = 0.2
    """First retry delay after a failed RPC; doubles up to retry_max."""
    retry_max: float = 5.0
    """Largest retry delay."""
    retries: int = 5
    """Tries of a tensor push to a peer that cannot be reached before the push fails."""
    drain: float = 2.0
    """Seconds a server keeps reading a client stream it answers early (see net.drain_bytes)."""
    keepalive: float = 10.0
    """Seconds between HTTP/2 keepalive pings on every channel, idle or not: a connection whose peer
    froze or whose link died (no RST, no FIN) is dropped and made anew instead of holding calls
    until their deadlines. At least 1 (servers send away clients that ping more often than every 0.5 s)."""
    keepalive_timeout: float = 10.0
    """Seconds a keepalive ping may go unanswered before its connection is dropped (its calls fail
    with UNAVAILABLE). A ping queues behind the bytes in flight: on a slow link keep this above a
    chunk's transfer time (net.max_message_bytes at timeouts.link_mbit)."""
    link_mbit: float = 10.0
    """The slowest link (Mbit/s) that deadlines allow for: every deadline of a call that moves a
    tensor or a state adds its size at this rate (a 16 MiB tensor: 13 s at 10 Mbit/s), so a slow
    honest link never reads as a fault."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0 and not (f.name == "audit" and self.audit == 0):
                raise ConfigError(f"timeouts.{f.name} must be positive, got {getattr(self, f.name)}"
                                  + (" (0 sizes it per audit)" if f.name == "audit" else ""))
        if self.keepalive < 1:
            raise ConfigError(f"timeouts.keepalive must be at least 1 (second): servers refuse pings more often, "
                              f"got {self.keepalive}")
        if self.heartbeat_timeout <= 2 * self.heartbeat_interval:
            raise ConfigError(
                "timeouts.heartbeat_timeout must be more than twice timeouts.heartbeat_interval "
                f"({self.heartbeat_timeout} <= 2 x {self.heartbeat_interval})"
            )

    def transfer(self, nbytes: int) -> float:
        """Seconds ``nbytes`` take at ``link_mbit``: what a deadline of a call moving them adds."""
        return nbytes * 8 / (self.link_mbit * 1e6)

    def keepalive_options(self) -> list[tuple[str, int]]:
        """Channel options: a ping every ``keepalive`` seconds, with or without calls in flight,
        the connection dropped when one goes unanswered for ``keepalive_timeout``."""
        # gRPC >= 1.6x times a ping's ack with http2.ping_timeout_ms (default 60 s), not keepalive_timeout_ms
        return [("grpc.keepalive_time_ms", int(self.keepalive * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)),
                ("grpc.http2.ping_timeout_ms", int(self.keepalive_timeout * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0)]


KEEPALIVE_FLOOR_MS = 500
"""Servers accept a client's pings this often at most: half the shortest ``timeouts.keepalive``
(1 s), so that an honest client's timer jitter never counts; more often earns ping strikes and, at
gRPC's limit, a GOAWAY ("too_many_pings"): a flood of pings costs the flooder its connection."""


def server_keepalive_options(timeouts: "TimeoutConfig") -> list[tuple[str, int]]:
    """Server options: permit clients' keepalive pings (idle connections too) down to
    ``KEEPALIVE_FLOOR_MS``, and ping clients on the same schedule as channels do."""
    return [("grpc.keepalive_time_ms", int(timeouts.keepalive * 1000)),
            ("grpc.keepalive_timeout_ms", int(timeouts.keepalive_timeout * 1000)),
            ("grpc.http2.ping_timeout_ms", int(timeouts.keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_FLOOR_MS),  # its name in gRPC 1.85
            ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_FLOOR_MS),  # and in older releases
            ("grpc.http2.max_pings_without_data", 0)]


def add_tls_flags(p: "argparse.ArgumentParser", server: bool = True) -> None:
    """The ``--tls-*`` flags every daemon and client command takes (they set ``net.tls_*``)."""
    p.add_argument("--tls-cert", help="PEM certificate of this " + ("daemon: serve gRPC over TLS (with --tls-key)"
                                                                     if server else "client (mutual TLS)"))
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", help="PEM CA bundle peers' certificates must chain to (turns on TLS for calls)")
    if server:
        p.add_argument("--tls-require-client-cert", action="store_true", default=None,
                       help="mutual TLS: refuse clients without a certificate signed by --tls-ca")


def tls_flag_values(args: "argparse.Namespace", prefix: str = "net.") -> dict[str, Any]:
    """``add_tls_flags``' values as dotted config keys (None for flags not given)."""
    return {f"{prefix}tls_cert": args.tls_cert, f"{prefix}tls_key": args.tls_key, f"{prefix}tls_ca": args.tls_ca,
            f"{prefix}tls_require_client_cert": getattr(args, "tls_require_client_cert", None)}


# -- the loader ------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is list:
        (inner,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, inner, where) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            return value.lower() in {"1", "true", "yes", "on"}
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            return typ(value) if typ is float or isinstance(value, (int, str)) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {'an integer' if typ is int else 'a number'}, got {value!r}") from None
    if typ is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {typ}")  # pragma: no cover


def _build(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    types = _field_types(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where or 'top level'}; valid keys: {sorted(names)}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        typ = types[f.name]
        path = f"{where}.{f.name}" if where else f.name
        if is_dataclass(typ):
            sub = values[f.name]
            if not isinstance(sub, Mapping):
                raise ConfigError(f"[{path}] must be a table")
            kwargs[f.name] = _build(typ, sub, path)
        else:
            kwargs[f.name] = _coerce(values[f.name], typ, path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:  # __post_init__ of model configs etc.
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _env_overrides(cls: type, prefix: str, environ: Mapping[str, str]) -> dict:
    tree: dict = {}
    types = _field_types(cls)
    for f in fields(cls):
        typ = types[f.name]
        if is_dataclass(typ):
            for sub in fields(typ):
                key = f"{prefix}{f.name}_{sub.name}".upper()
                if key in environ:
                    _set_dotted(tree, f"{f.name}.{sub.name}", environ[key])
        else:
            key = f"{prefix}{f.name}".upper()
            if key in environ:
                tree[f.name] = environ[key]
    return tree


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load(
    cls: type[T],
    *,
    path: str | Path | None = None,
    cli: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    env_prefix: str = "PIPEGUARD_",
) -> T:
    """Build ``cls`` from defaults < TOML file < environment < CLI (dotted keys, None skipped)."""
    tree: dict = {}
    if path:
        try:
            with open(path, "rb") as fh:
                tree = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    tree = _merge(tree, _env_overrides(cls, env_prefix, os.environ if environ is None else environ))
    for dotted, value in (cli or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    return _build(cls, tree, "")


def to_toml(cfg: Any) -> str:
    """Render a config dataclass as TOML (for logs and the status API)."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        # A TOML basic string: JSON's escapes (\", \\, \n, \t, \uXXXX) are all valid TOML, so quotes,
        # backslashes and control characters survive; DEL is the one JSON leaves raw and TOML forbids.
        return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")

    top, sections = [], []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if is_dataclass(v):
            body = "\n".join(f"{sf.name} = {scalar(getattr(v, sf.name))}" for sf in fields(v))
            sections.append(f"[{f.name}]\n{body}")
        else:
            top.append(f"{f.name} = {scalar(v)}")
    return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"


def field_docs(cls: type) -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, docstring) for every field; feeds the README's reference."""
    import ast
    import inspect
    import textwrap

    def docs_of(c: type) -> dict[str, str]:
        tree = ast.parse(textwrap.dedent(inspect.getsource(c)))
        out, body = {}, tree.body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                out[a.target.id] = " ".join(b.value.value.split())
        return out

    rows = []
    types = _field_types(cls)
    docs = docs_of(cls)
    for f in fields(cls):
        typ = types[f.name]
        if is_dataclass(typ):
            sub_docs = docs_of(typ)
            sub_types = _field_types(typ)
            default = f.default_factory()  # type: ignore[misc]
            for sf in fields(typ):
                typ_name = getattr(sub_types[sf.name], "__name__", str(sub_types[sf.name]))
                rows.append((f"{f.name}.{sf.name}", typ_name, getattr(default, sf.name), sub_docs.get(sf.name, "")))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((f.name, getattr(typ, "__name__", str(typ)), default, docs.get(f.name, "")))
    return rows

