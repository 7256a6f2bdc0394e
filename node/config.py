"""The node daemon's configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeguard import device as devices
from pipeguard.config import ConfigError, NetConfig, TimeoutConfig, parse_hostport


@dataclass
class AttackConfig:
    """Misbehaviour for experiments on your own testnet. Empty = honest. See node/attacks.py and the
    README's attack table for what each behaviour does."""

    behaviours: list[str] = field(default_factory=list)
    """Built-in attacks: forward:KIND or backward:KIND (KIND: reverse, random, noise, scale, zero, sign-flip,
    constant-direction, stale, ride), forward:switch-attempt, wire:bad-signature, wire:replay, wire:equivocate,
    state:false-commitment, state:backdoor, state:off-attestation, state:withhold, update:skip, update:poison, update:ride,
    update:swap-after-commit, audit:accuse, audit:clear, audit:shield, refusal:frame, node:silent, node:slow."""
    rate: float = 1.0
    """Probability, per message or event (micro-batch, served fetch, update, verdict), that an attack fires."""
    start_step: int = 0
    """First step at which attacks fire (a patient attacker behaves until then)."""
    stop_step: int = -1
    """Attacks fire for start_step <= step < stop_step; -1 = they never stop."""
    micro_batches: list[int] = field(default_factory=list)
    """Micro-batches the tensor and wire attacks target, e.g. [0, 2]; empty = all."""
    noise_std: float = 1.0
    """Absolute standard deviation of forward/backward:noise (Lu et al. use 1 on gradients)."""
    noise_scale: float = 0.0
    """When > 0, forward/backward:noise use this many times the tensor's own std instead of noise_std
    (small values try to slip under the screen); update:poison's relative scale (default 1e-2)."""
    scale: float = 10.0
    """The factor k of forward/backward:scale."""
    fraction: float = 0.1
    """Fraction of elements whose sign forward/backward:sign-flip flips, in (0, 1]."""
    delay: float = 2.0
    """Seconds node:slow waits before each tensor it sends."""
    ride: float = 0.9
    """The share of the audit's per-element allowance (at the default tolerance) that forward/backward:ride
    and update:ride spend: below 1 stays within it, above 1 exceeds it."""
    accomplices: list[str] = field(default_factory=list)
    """Node ids audit:clear signs PASS for; empty = everybody it audits."""
    plugin: str = ""
    """A user behaviour as path/to/file.py:ClassName (see node/attacks.py for the interface)."""
    seed: int = 0
    """Seed for the attack's own coin flips and directions (0 derives one from the node id)."""

    def __post_init__(self) -> None:
        from node.attacks import BUILTINS

        for b in self.behaviours:
            if b not in BUILTINS:
                raise ConfigError(f"unknown attack {b!r}; choose from {sorted(BUILTINS)}")
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError(f"attack.rate must be in [0, 1], got {self.rate}")
        if self.start_step < 0:
            raise ConfigError(f"attack.start_step must be >= 0, got {self.start_step}")
        if self.stop_step != -1 and self.stop_step <= self.start_step:
            raise ConfigError(f"attack.stop_step must be -1 (never stop) or greater than attack.start_step "
                              f"({self.start_step}), got {self.stop_step}")
        bad = [m for m in self.micro_batches if m < 0]
        if bad:
            raise ConfigError(f"attack.micro_batches are micro-batch indices (>= 0), got {bad}")
        if self.noise_std < 0 or not math.isfinite(self.noise_std):
            raise ConfigError(f"attack.noise_std must be a finite number >= 0, got {self.noise_std}")
        if self.noise_scale < 0 or not math.isfinite(self.noise_scale):
            raise ConfigError(f"attack.noise_scale must be a finite number >= 0 (0 = use noise_std), "
                              f"got {self.noise_scale}")
        if not math.isfinite(self.scale):
            raise ConfigError(f"attack.scale must be finite, got {self.scale}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"attack.fraction must be in (0, 1], got {self.fraction}")
        if self.ride < 0 or not math.isfinite(self.ride):
            raise ConfigError(f"attack.ride must be a finite number >= 0 (1 = the whole allowance), got {self.ride}")
        if self.delay < 0 or not math.isfinite(self.delay):
            raise ConfigError(f"attack.delay must be a finite number of seconds >= 0, got {self.delay}")
        if self.plugin and ":" not in self.plugin:
            raise ConfigError("attack.plugin must be PATH.py:ClassName")


@dataclass
class NodeConfig:
    coordinator: str = "127.0.0.1:7000"
    """Coordinator address HOST:PORT."""
    coordinator_key: str = ""
    """Pin the coordinator's Ed25519 public key (hex). Empty: trust on first use — the key of the first
    coordinator this node registers with is kept in HOME/coordinator.pub and any other key is refused
    until that file is deleted or a key is pinned here (a pin overrides and replaces the file)."""
    home: str = "~/.pipeguard/node"
    """Directory for this node's key (node.key, 0600), the trusted coordinator key (coordinator.pub)
    and the dataset cache."""
    threads: int = 1
    """Torch intra-op threads for this node's compute."""
    device: str = "auto"
    """Where this node computes its stage and its audits: cpu, cuda, cuda:N, or auto (cuda:0 when torch
    sees a GPU, else cpu). Its device class (cpu, cuda:<GPU name>) is registered with the coordinator,
    which picks auditors of the same class first; see docs/gpu.md."""
    tf32: bool = False
    """Let CUDA float32 matmuls use TF32 (faster, not bit-reproducible against fp32 auditors; off)."""
    log_level: str = "INFO"
    """Logging level: DEBUG, INFO, WARNING, ERROR."""
    ready_file: str = ""
    """If set, write {address, node_id} JSON here once serving (for scripts and tests)."""
    net: NetConfig = field(default_factory=NetConfig)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)

    def __post_init__(self) -> None:
        parse_hostport(self.coordinator, "coordinator")
        if self.threads < 1:
            raise ConfigError("threads must be >= 1")
        try:
            self.device = devices.check(self.device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.coordinator_key:
            try:
                if len(bytes.fromhex(self.coordinator_key)) != 32:
                    raise ValueError
            except ValueError:
                raise ConfigError("coordinator_key must be 64 hex characters (a raw Ed25519 public key)") from None
