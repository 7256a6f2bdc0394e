"""The node daemon's configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeguard.config import ConfigError, NetConfig, TimeoutConfig, parse_hostport


@dataclass
class AttackConfig:
    """Misbehaviour for experiments on your own testnet. Empty = honest."""

    behaviours: list[str] = field(default_factory=list)
    """Built-in attacks as DIRECTION:KIND, e.g. forward:reverse, forward:random, backward:noise."""
    rate: float = 1.0
    """Probability per micro-batch that an attack fires."""
    start_step: int = 0
    """First step at which attacks fire."""
    noise_std: float = 1.0
    """Standard deviation of backward:noise (absolute, as in Lu et al.)."""
    plugin: str = ""
    """A user behaviour as path/to/file.py:ClassName (see node/attacks.py for the interface)."""
    seed: int = 0
    """Seed for the attack's own coin flips (0 derives one from the node id)."""

    def __post_init__(self) -> None:
        from node.attacks import BUILTINS

        for b in self.behaviours:
            if b not in BUILTINS:
                raise ConfigError(f"unknown attack {b!r}; choose from {sorted(BUILTINS)}")
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError(f"attack.rate must be in [0, 1], got {self.rate}")
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
        if self.coordinator_key:
            try:
                if len(bytes.fromhex(self.coordinator_key)) != 32:
                    raise ValueError
            except ValueError:
                raise ConfigError("coordinator_key must be 64 hex characters (a raw Ed25519 public key)") from None
