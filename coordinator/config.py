"""The coordinator's run configuration (one TOML file; see README's config reference)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeguard import compression, computation
from pipeguard import device as devices
from pipeguard.config import ConfigError, MiB, NetConfig, TimeoutConfig
from pipeguard.model import GPTConfig, OptimSettings, partition, preset
from pipeguard.v1 import pipeguard_pb2 as pb


AUDIT_COMPUTE_MARGIN = 8.0
"""A sized audit deadline allows this many times the compute the audited stage reported for its step
(an update audit replays all of it; the auditor may be slower hardware)."""

MEMBER_BYTES = 100
"""Least room a member takes in a heartbeat reply (32-character id, 32-byte key, a short address)."""


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Named size: tiny (0.2M params), small (6.4M) or gpt2 (85M, GPT-2 124M's shape with bytes)."""
    n_layer: int = 0
    """Override the preset's block count (0 keeps the preset)."""
    n_head: int = 0
    """Override the preset's attention heads (0 keeps the preset)."""
    n_embd: int = 0
    """Override the preset's width (0 keeps the preset)."""
    block_size: int = 0
    """Override the preset's sequence length (0 keeps the preset)."""
    dropout: float = 0.0
    """Residual dropout; masks derive from signed header values, so audits can replay them."""

    def __post_init__(self) -> None:
        self.gpt()  # validates

    def gpt(self) -> GPTConfig:
        overrides = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(self, k)}
        try:
            return preset(self.preset, dropout=self.dropout, **overrides)
        except ValueError as exc:
            raise ConfigError(f"[model]: {exc}") from None


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to run."""
    seed: int = 1234
    """Run seed: weights, data order and dropout derive from it."""
    micro_batches: int = 8
    """Micro-batches per step (more shrinks the pipeline bubble)."""
    micro_batch_size: int = 8
    """Sequences per micro-batch."""
    lr: float = 3e-3
    """Peak learning rate."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr x min_lr_ratio."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (over all stages) to this; 0 disables."""
    max_in_flight: int = 0
    """Micro-batches a stage may have forwarded but not yet backwarded (0 = all: GPipe)."""
    compute_dtype: str = "fp32"
    """fp32, or bf16 (autocast of matmuls and attention; weights and optimizer state stay float32,
    the wire is train.wire_dtype). In every node's signed assignment, so auditors replay it; bf16 needs a larger
    audit.tolerance (docs/gpu.md)."""
    wire_dtype: str = "fp32"
    """What activations and gradients travel between stages as: fp32 (float32, 4 bytes per
    element), fp16 or bf16 (2 bytes), or int8 (8-bit blocks of 64 with a power-of-two scale each,
    1.0625 bytes per element). The signed bytes are the compressed ones, a deterministic function
    of the tensor, so exact audits stay exact; in every node's signed assignment and every audit
    order (pipeguard/compression.py, docs/wan.md "Compression")."""

    def __post_init__(self) -> None:
        try:
            devices.compute_dtype(self.compute_dtype)
            compression.check(self.wire_dtype)
        except ValueError as exc:
            raise ConfigError(f"train.{exc}") from None
        for name in ("steps", "micro_batches", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1")
        if self.lr <= 0:
            raise ConfigError("train.lr must be positive")
        if self.max_in_flight < 0:
            raise ConfigError("train.max_in_flight must be >= 0 (0 means micro_batches)")

    def optim(self) -> OptimSettings:
        return OptimSettings(
            lr=self.lr, warmup_steps=self.warmup_steps, total_steps=self.steps, min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay, beta1=self.beta1, beta2=self.beta2, grad_clip=self.grad_clip,
        )


@dataclass
class PipelineConfig:
    stages: int = 3
    """Pipeline stages; the first this many registered nodes serve them, later ones stand by."""
    min_nodes: int = 0
    """Live nodes to wait for before the first step (0 = stages). Set it to stages + the
    standbys you want ready from step 0, e.g. to audit and take over from the start."""
    max_step_attempts: int = 3
    """Attempts of one step (each aborted and retried after timeouts.retry_backoff x attempts) before
    the pipeline is formed again; the failures are then attributed from the refusals receivers
    reported (coordinator/attribution.py): the node its neighbours refused is routed around (a
    standby takes its stage; demoted only once two different neighbours refused it), or, with no
    refusal charged to anyone, one pipeline node in turn. Nobody is banned for it."""

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise ConfigError("pipeline.stages must be >= 1")
        if self.min_nodes < 0:
            raise ConfigError("pipeline.min_nodes must be >= 0 (0 means pipeline.stages)")
        if self.max_step_attempts < 1:
            raise ConfigError(f"pipeline.max_step_attempts must be >= 1 (1 re-forms the pipeline after the first "
                              f"failure), got {self.max_step_attempts}")


@dataclass
class DataConfig:
    path: str = ""
    """A UTF-8/bytes text file to train on; empty uses the Python standard library's sources."""
    max_bytes: int = 4 * MiB
    """Cap on the standard-library corpus size."""


@dataclass
class AuditConfig:
    rate: float = 0.05
    """Probability that each stage's output for each micro-batch (forward and backward) is audited,
    and that each stage's optimizer update is audited, per step. 1 checks every message."""
    tolerance: float = 1e-4
    """Per-element relative deviation above which a recomputation fails: each activation or
    gradient element may differ by at most tolerance x (|claimed| + rms(claimed tensor)), and each
    new weight and AdamW moment must lie within the range that gradients within that bound
    produce (no weight stepping by more than AdamW's cap); 0 = exact mode (bit-identical results,
    for identical hardware and thread counts). Honest recomputation with 1 vs 2 threads: see
    docs/threat-model.md, "Tolerance"."""
    cross_device_tolerance: float = 1e-3
    """The tolerance a recomputation on another device class than the audited node's applies (e.g. a
    CPU auditor of a GPU node), when larger than tolerance; unused in exact mode, which admits only
    the judge's build. Auditors of the target's own class are picked first. docs/gpu.md."""
    device: str = "cpu"
    """Where the coordinator's judge recomputes: cpu, cuda, cuda:N or auto (cuda:0 when available)."""
    screen: bool = True
    """Always audit tensors that a receiver's statistical screen flags."""
    recheck_rate: float = 0.1
    """Fraction of PASS verdicts the coordinator re-checks by its own recomputation (screen-flagged
    messages that came back PASS are always re-checked). A PASS contradicted by the recomputation
    bans the audited node and the auditor that cleared it, each with an evidence bundle: an auditor
    covering for an accomplice is caught after about 1 / recheck_rate of its false verdicts. 0 trusts
    every PASS (a colluding auditor can then shield its accomplice for as long as it is chosen)."""
    follow: float = 16.0
    """Mean number of consecutive audits of a stage ordered from the same auditor (a run of random
    length from the CSPRNG, its auditor drawn at random like any other, kept only while it keeps
    up): a following auditor starts each audit from the state it verified by recomputing the last
    one and fetches only tensors. 1 draws every audit's auditor afresh (every audit fetches a state)."""
    retention: int = 4
    """Steps that nodes keep state snapshots and sent/received tensors. Audits of a step finish
    before the step `retention` later applies its update, so a conviction can always roll back."""
    checkpoint_every: int = 10
    """Steps between verified coordinator checkpoints of every stage (rollback targets)."""
    keep_checkpoints: int = 3
    """Checkpoints kept on disk, besides an older one that a rollback may still need (the newest at
    or before `retention` steps back)."""
    shutdown_checkpoint: float = 8.0
    """Seconds spent at most on a last checkpoint when the coordinator shuts down (docker stop waits
    10 s before it kills); a resumed run starts from the last checkpoint before it if none was made."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError(f"audit.rate must be in [0, 1], got {self.rate}")
        if self.tolerance < 0:
            raise ConfigError("audit.tolerance must be >= 0 (0 = exact mode)")
        if self.cross_device_tolerance < 0:
            raise ConfigError("audit.cross_device_tolerance must be >= 0 (0: the same as audit.tolerance)")
        try:
            self.device = devices.check(self.device, "audit.device")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not 0.0 <= self.recheck_rate <= 1.0:
            raise ConfigError(f"audit.recheck_rate must be in [0, 1], got {self.recheck_rate}")
        if not self.follow >= 1:
            raise ConfigError(f"audit.follow must be >= 1 (audits in a row per auditor), got {self.follow}")
        if self.retention < 2:
            raise ConfigError("audit.retention must be >= 2")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError("audit.checkpoint_every and audit.keep_checkpoints must be >= 1")
        if not self.shutdown_checkpoint > 0:
            raise ConfigError(f"audit.shutdown_checkpoint must be positive (seconds), got {self.shutdown_checkpoint}; "
                              "keep it below the time your supervisor waits before it kills the coordinator")


@dataclass
class RegistryConfig:
    max_nodes: int = 4096
    """Node records kept (live, offline and banned). A new key registering beyond it displaces the
    longest-silent offline node that holds no stage, or is refused (RESOURCE_EXHAUSTED). Heartbeat
    replies carry the member list when it changes, so this also bounds their size."""
    max_open_challenges: int = 10_000
    """Hello challenges issued and not yet answered (each lives timeouts.request seconds); one more
    Hello is refused (RESOURCE_EXHAUSTED) until some expire or are used."""
    registrations_per_s: float = 100.0
    """Sustained rate of registrations admitted (a token bucket, counted after the signature
    checks, so forged registrations cannot use it up); beyond it RESOURCE_EXHAUSTED, and nodes retry."""
    registration_burst: int = 2000
    """Registrations admitted at once before registrations_per_s applies (a whole testnet starting)."""

    def __post_init__(self) -> None:
        for name in ("max_nodes", "max_open_challenges", "registration_burst"):
            if getattr(self, name) < 1:
                raise ConfigError(f"registry.{name} must be >= 1")
        if not self.registrations_per_s > 0:
            raise ConfigError("registry.registrations_per_s must be positive")


@dataclass
class CoordinatorConfig:
    run_id: str = ""
    """Run identifier; empty generates one on first start (kept in the state directory)."""
    state_dir: str = "./pipeguard-run"
    """Where the coordinator keeps its key, run state and events (survives restarts)."""
    log_level: str = "INFO"
    """Logging level: DEBUG, INFO, WARNING, ERROR."""
    ready_file: str = ""
    """If set, write {address, node_id} JSON here once serving (for scripts and tests)."""
    resume: bool = False
    """Continue the run held in state_dir (``--resume``). Without it a state_dir that holds a run is refused,
    and with it one that holds none is."""
    admin_token_file: str = ""
    """File with the admin token that mutating calls (ban, unban, stop, audit rate) must present; empty means
    STATE_DIR/admin.token. Created 0600 with a random token on first start if missing."""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    net: NetConfig = field(default_factory=lambda: NetConfig(bind="127.0.0.1:7000"))
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)

    def __post_init__(self) -> None:
        if self.registry.max_nodes < max(self.pipeline.stages, self.pipeline.min_nodes):
            raise ConfigError(f"registry.max_nodes ({self.registry.max_nodes}) must be at least pipeline.stages "
                              "and pipeline.min_nodes")
        if self.registry.max_nodes * MEMBER_BYTES > self.net.max_message_bytes:
            raise ConfigError(
                f"registry.max_nodes ({self.registry.max_nodes}) members would not fit a heartbeat reply of "
                f"net.max_message_bytes ({self.net.max_message_bytes}) at {MEMBER_BYTES} bytes or more each; "
                "lower registry.max_nodes or raise net.max_message_bytes")
        gpt = self.model.gpt()
        if self.pipeline.stages > gpt.n_layer:
            raise ConfigError(
                f"pipeline.stages ({self.pipeline.stages}) exceeds the model's {gpt.n_layer} blocks; "
                "lower pipeline.stages or raise model.n_layer"
            )

    def audit_timeout(self, req: pb.AuditRequest | None = None, queued: int = 0) -> float:
        """Deadline of an Audit RPC for ``req`` with ``queued`` audits waiting before it at the
        auditor, and of the judge's fetches for it: ``timeouts.audit``, or when that is 0, sized to
        what the audit moves and recomputes (``audit_bytes`` at ``timeouts.link_mbit``, and
        ``AUDIT_COMPUTE_MARGIN`` x the compute seconds the audited stage reported, at most
        ``timeouts.step``) on top of ``timeouts.request``. The reported seconds are the audited
        node's word: a low figure only hands its audits to the judge sooner, and a high one gains
        no more than the step timeout."""
        t = self.timeouts
        if t.audit:
            return t.audit
        reported = req.report.compute_seconds if req is not None else t.step
        compute = t.step if reported != reported else min(t.step, AUDIT_COMPUTE_MARGIN * max(0.0, reported))  # NaN
        stage = req.stage if req is not None else None
        return (1 + max(0, queued)) * (t.request + t.transfer(self.audit_bytes(stage)) + compute)

    def audit_bytes(self, stage: int | None = None) -> int:
        """Bytes an audit of ``stage`` (None: the largest) moves at most: the stage's state (weights and
        both AdamW moments, fetched before and after an update) and, for an update audit, every
        micro-batch's activations and gradients in and out, from both of their holders."""
        gpt, stages = self.model.gpt(), self.pipeline.stages
        specs = partition(gpt, stages)
        C, V, T = gpt.n_embd, gpt.vocab_size, gpt.block_size

        def params(spec) -> int:
            n = len(spec.blocks) * (12 * C * C + 13 * C)
            n += (V * C + T * C) if spec.has_embedding else 0
            return n + ((V * C + 2 * C) if spec.has_head else 0)

        state = 4 * 3 * max(params(s) for s in (specs if stage is None or stage >= stages else [specs[stage]]))
        t = self.train
        activation = 4 * t.micro_batch_size * T * C
        return 2 * state + 8 * t.micro_batches * activation

    def model_spec(self) -> pb.ModelSpec:
        """The model as stages and auditors are told it."""
        return computation.model_spec(self.model.gpt())

    def train_spec(self) -> pb.TrainSpec:
        """The training settings as stages and auditors are told them."""
        t = self.train
        return computation.train_spec(t.optim(), seed=t.seed, micro_batches=t.micro_batches,
                                      micro_batch_size=t.micro_batch_size, max_in_flight=t.max_in_flight,
                                      retention_steps=self.audit.retention, compute_dtype=t.compute_dtype,
                                      wire_dtype=t.wire_dtype)
