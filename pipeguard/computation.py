"""The stage computation: the one definition of a pipeline stage's math.

Every party that computes a stage runs this module and nothing else: the training node, the
node auditor and the coordinator's judge (through ``pipeguard.audit.check``), ``pipeguard
verify``, the single-process reference (a one-stage set-up) and the tolerance benchmark. An
audit convicts when a recomputation disagrees with a node's claim, so two copies of this math
that drift apart would convict every honest node; there is one copy.

- ``StageSetup``: what a stage computes, from the wire specs (``from_specs``) or from config,
  validated once; ``model_spec``/``train_spec`` are the way back to the wire.
- ``StageComputation``: the stage's module and AdamW optimizer, built from the run seed or from
  a named state, with forward and backward of one micro-batch, the gradient norm, the
  optimizer update, the named state and its digest.
- ``update_bounds``: per element, the range of new weights and AdamW moments that any gradient
  within an audit's per-element tolerance of this one produces (what update audits accept).
- ``Determinism``: the process-wide torch settings under which results are bit-identical
  between parties with the same thread count (and, on CUDA, the same GPU model and build);
  every entry point applies it the same way (``Determinism.for_device``).

Device (pipeguard/device.py): a computation lives on one ``torch.device``. Its module, AdamW
state, activations, autograd graph and snapshots stay there; tensors cross to host memory only
at the wire: what arrives (tokens, received activations and gradients) is moved to the device
once in ``forward``/``backward`` (decompressed first: ``compression.decompress``), and what leaves
(``to_wire``) is copied to the host once, as float32, on the compute thread, and compressed there
to the run's wire dtype (``StageSetup.wire_dtype``, pipeguard/compression.py). A state's digest
reads each tensor's bytes through the host.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from pipeguard import compression
from pipeguard import device as devices
from pipeguard.compression import Packed
from pipeguard.data import Dataset
from pipeguard.errors import InvalidArgument
from pipeguard.model import (
    GPTConfig,
    OptimSettings,
    Randomness,
    StageModule,
    StageSpec,
    clip_and_step,
    grad_sq_norm,
    load_named_state,
    make_optimizer,
    named_state,
    partition,
)
from pipeguard.tensors import state_digest
from pipeguard.v1 import pipeguard_pb2 as pb

# -- determinism -------------------------------------------------------------------------------

REFEREE_THREADS = 1
"""Torch threads of the coordinator's judge and of ``pipeguard verify``: one, like a node at its
default (``NodeConfig.threads``), so that their recomputations of an honest default node are
bit-identical to its claims (benchmarks/audit_tolerance.py: other thread counts differ in the
last bits, within the audit tolerance)."""


@dataclass(frozen=True)
class Determinism:
    """Process-wide torch settings that make a stage's results a function of its inputs.

    Torch keeps these as global state; this is the one place that sets them. ``threads`` is
    the intra-op thread count (results are bit-identical only between equal counts);
    float32 matmuls run at full precision. ``deterministic_algorithms`` asks torch for
    deterministic kernels where it has a choice; on CPU every op the model uses has one kernel
    and results are bit-identical either way (tests/test_computation.py, the pipeline-vs-reference
    test), while the first ``torch.use_deterministic_algorithms`` call, even to turn it off,
    costs 1.3 s (2-5 s on a loaded machine) of imports on every daemon start, so it is off by
    default and only set when asked for (an accelerator's kernels are where it matters).
    Apply it once at start (``apply``) or for a bounded piece of work (``scope``)."""

    threads: int
    """Intra-op threads (``torch.set_num_threads``)."""
    deterministic_algorithms: bool = False
    """``torch.use_deterministic_algorithms``."""
    warn_only: bool = True
    """With deterministic algorithms: warn instead of raising for an op that has none."""
    matmul_precision: str = "highest"
    """``torch.set_float32_matmul_precision``; anything lower may use reduced-precision kernels
    ("high" lets CUDA matmuls use TF32)."""
    cudnn_tf32: bool = False
    """``torch.backends.cudnn.allow_tf32`` (cuDNN convolutions; the model has none, kept off)."""

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    @classmethod
    def for_device(cls, threads: int, device: torch.device, tf32: bool = False) -> "Determinism":
        """The settings a party computing on ``device`` applies: on CUDA, deterministic algorithms
        (warning, not failing, for an op that has none) and TF32 off unless ``tf32``;
        ``CUBLAS_WORKSPACE_CONFIG`` is set by pipeguard.device before CUDA starts."""
        devices.prepare()
        return cls(threads=threads, deterministic_algorithms=device.type == "cuda",
                   matmul_precision="high" if tf32 else "highest", cudnn_tf32=tf32)

    @classmethod
    def current(cls) -> "Determinism":
        """The settings in force now."""
        return cls(threads=torch.get_num_threads(),
                   deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
                   warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
                   matmul_precision=torch.get_float32_matmul_precision(),
                   cudnn_tf32=torch.backends.cudnn.allow_tf32)

    def apply(self) -> "Determinism":
        """Put these settings in force for the whole process; returns the ones they replace."""
        previous = Determinism.current()
        torch.set_num_threads(self.threads)
        if self.deterministic_algorithms != previous.deterministic_algorithms or (
                self.deterministic_algorithms and self.warn_only != previous.warn_only):
            torch.use_deterministic_algorithms(self.deterministic_algorithms, warn_only=self.warn_only)
        torch.set_float32_matmul_precision(self.matmul_precision)
        torch.backends.cudnn.allow_tf32 = self.cudnn_tf32
        return previous

    @contextmanager
    def scope(self) -> Iterator[None]:
        """These settings inside the ``with`` block, the previous ones after it."""
        previous = self.apply()
        try:
            yield
        finally:
            previous.apply()


def node_build(threads: int | None = None, device: str | torch.device = "cpu") -> pb.NodeBuild:
    """The build a party computes with: torch version, device class (``device``: a class name or a
    ``torch.device``, see ``pipeguard.device.device_class``), CUDA version and intra-op threads
    (those in force now unless ``threads`` is given). Recomputations are bit-identical only
    between equal builds; nodes register theirs and the coordinator plans audits by it."""
    cls = devices.device_class(device) if isinstance(device, torch.device) else device
    return pb.NodeBuild(torch_version=torch.__version__, device=cls,
                        threads=torch.get_num_threads() if threads is None else threads,
                        cuda_version=(torch.version.cuda or "") if cls.startswith("cuda") else "")


def describe_build(build: pb.NodeBuild) -> str:
    """One line for logs and status, e.g. ``torch 2.13.0+cpu, cpu, 1 thread``."""
    if not build.torch_version:
        return "unknown build"
    cuda = f" (CUDA {build.cuda_version})" if build.cuda_version else ""
    return (f"torch {build.torch_version}, {build.device or '?'}{cuda}, "
            f"{build.threads} thread{'s' if build.threads != 1 else ''}")


# -- the set-up --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageSetup:
    """What one stage of a run computes: the model, its share of it, batching and optimizer.

    Built from the wire specs (``from_specs``: nodes, auditors, the judge, verify) or directly
    from config (the reference, benchmarks); both validate here, raising InvalidArgument."""

    stage: int
    """Stage index, 0-based."""
    num_stages: int
    """Stages in the pipeline."""
    gpt: GPTConfig
    optim: OptimSettings
    seed: int
    """Run seed: weight init, data sampling and dropout masks derive from it."""
    micro_batches: int
    """Micro-batches per optimizer step (the last stage scales each loss by 1 / micro_batches)."""
    micro_batch_size: int
    """Sequences per micro-batch."""
    compute_dtype: str = "fp32"
    """``fp32`` or ``bf16`` (autocast; pipeguard.device): part of the run's signed train spec."""
    wire_dtype: str = "fp32"
    """``fp32``, ``fp16``, ``bf16`` or ``int8``: what the stage's outputs travel as
    (pipeguard/compression.py); part of the run's signed train spec."""
    spec: StageSpec = field(init=False, repr=False)
    """The blocks this stage holds (``partition``)."""

    def __post_init__(self) -> None:
        if not 0 <= self.stage < self.num_stages:
            raise InvalidArgument(f"stage {self.stage} is not within {self.num_stages} stages")
        if self.num_stages > self.gpt.n_layer:
            raise InvalidArgument(f"{self.num_stages} stages for {self.gpt.n_layer} blocks: use at most "
                                  f"{self.gpt.n_layer} stages")
        if self.micro_batches < 1 or self.micro_batch_size < 1:
            raise InvalidArgument(f"micro_batches ({self.micro_batches}) and micro_batch_size "
                                  f"({self.micro_batch_size}) must be >= 1")
        try:
            devices.compute_dtype(self.compute_dtype)
            object.__setattr__(self, "wire_dtype", compression.check(self.wire_dtype))
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        object.__setattr__(self, "spec", partition(self.gpt, self.num_stages)[self.stage])

    @classmethod
    def from_specs(cls, model: pb.ModelSpec, train: pb.TrainSpec, stage: int, num_stages: int) -> "StageSetup":
        """The set-up an order describes (AssignRequest, AuditRequest); InvalidArgument if it is unusable."""
        return cls(stage=stage, num_stages=num_stages, gpt=gpt_config(model), optim=optim_settings(train),
                   seed=train.seed, micro_batches=train.micro_batches, micro_batch_size=train.micro_batch_size,
                   compute_dtype=train.compute_dtype or "fp32", wire_dtype=train.wire_dtype or "fp32")

    @property
    def is_first(self) -> bool:
        """Holds the embedding: takes token ids, sends no input gradient."""
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        """Holds the head: computes the loss, sends no activation."""
        return self.stage == self.num_stages - 1

    @property
    def wire(self) -> int:
        """The ``pb.DType`` every activation and gradient between stages travels as."""
        return compression.WIRE_DTYPES[self.wire_dtype]

    @property
    def activation_shape(self) -> list[int]:
        """Shape of every activation and gradient crossing a stage boundary: (B, T, C)."""
        return [self.micro_batch_size, self.gpt.block_size, self.gpt.n_embd]

    def batch(self, dataset: Dataset, step: int, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (inputs, targets) token ids of one micro-batch, each (B, T)."""
        return dataset.batch(self.seed, step, micro_batch, self.micro_batch_size, self.gpt.block_size)


def gpt_config(model: pb.ModelSpec) -> GPTConfig:
    """The model a ModelSpec describes; InvalidArgument if it is not a valid one."""
    try:
        return GPTConfig(block_size=model.block_size, vocab_size=model.vocab_size, n_layer=model.n_layer,
                         n_head=model.n_head, n_embd=model.n_embd, dropout=model.dropout)
    except ValueError as exc:
        raise InvalidArgument(f"bad model spec: {exc}") from None


def optim_settings(train: pb.TrainSpec) -> OptimSettings:
    """The optimizer settings of a TrainSpec."""
    return OptimSettings(lr=train.lr, warmup_steps=train.warmup_steps, total_steps=train.total_steps,
                         min_lr_ratio=train.min_lr_ratio, weight_decay=train.weight_decay, beta1=train.beta1,
                         beta2=train.beta2, grad_clip=train.grad_clip)


def model_spec(gpt: GPTConfig) -> pb.ModelSpec:
    """The wire form of ``gpt`` (inverse of ``gpt_config``)."""
    return pb.ModelSpec(block_size=gpt.block_size, vocab_size=gpt.vocab_size, n_layer=gpt.n_layer,
                        n_head=gpt.n_head, n_embd=gpt.n_embd, dropout=gpt.dropout)


def train_spec(optim: OptimSettings, *, seed: int, micro_batches: int, micro_batch_size: int,
               max_in_flight: int = 0, retention_steps: int = 0, compute_dtype: str = "fp32",
               wire_dtype: str = "fp32") -> pb.TrainSpec:
    """The wire form of a run's training settings (``optim_settings`` reads the optimizer part back)."""
    return pb.TrainSpec(seed=seed, micro_batches=micro_batches, micro_batch_size=micro_batch_size, lr=optim.lr,
                        warmup_steps=optim.warmup_steps, total_steps=optim.total_steps,
                        min_lr_ratio=optim.min_lr_ratio, weight_decay=optim.weight_decay, beta1=optim.beta1,
                        beta2=optim.beta2, grad_clip=optim.grad_clip, max_in_flight=max_in_flight,
                        retention_steps=retention_steps,
                        compute_dtype="" if compute_dtype == "fp32" else compute_dtype,  # fp32: the default, unset
                        wire_dtype="" if wire_dtype == "fp32" else wire_dtype)  # (old digests stay valid)


# -- the computation ---------------------------------------------------------------------------


@dataclass
class Forward:
    """One micro-batch's forward pass, kept (with its autograd graph) until its backward."""

    step: int
    micro_batch: int
    x: torch.Tensor
    """The input: token ids (B, T) on the first stage, else the received activation (B, T, C),
    a leaf that collects the input gradient."""
    y: torch.Tensor
    """The output: logits (B, T, vocab) on the last stage, else the activation (B, T, C)."""

    @property
    def output(self) -> torch.Tensor:
        """What this stage sends forward: the output, out of the graph."""
        return self.y.detach()  # (B, T, C)


class StageComputation:
    """A stage's module and optimizer, and the math every party runs on them, on one device.

    Not thread-safe: one caller (a node's compute thread, an audit) at a time."""

    def __init__(self, setup: StageSetup, module: StageModule, opt: torch.optim.Optimizer,
                 device: torch.device = torch.device("cpu")):
        self.setup = setup
        self.module = module
        self.opt = opt
        self.device = device
        """Where the module, optimizer state, activations and snapshots live."""

    @classmethod
    def build(cls, setup: StageSetup, state: dict[str, torch.Tensor] | None = None,
              device: torch.device | None = None) -> "StageComputation":
        """The stage at the run seed's initial weights, or at ``state`` (names as ``state()`` gives
        them; ValueError or RuntimeError if it does not fit this stage), on ``device`` (cpu if None).
        Initial weights are drawn on the host (CPU generators) and copied, so every device starts
        from the same bits."""
        device = torch.device("cpu") if device is None else device
        if state is None:
            module = StageModule(setup.gpt, setup.spec, setup.seed).to(device)
        else:  # every weight comes from ``state``: no random init to throw away (audits build one each)
            with torch.device("meta"):
                module = StageModule(setup.gpt, setup.spec, setup.seed, init=False)
            module = module.to_empty(device=device)
        comp = cls(setup, module, make_optimizer(module, setup.optim), device)
        if state is not None:
            comp.load(state)  # ValueError unless it names every parameter: nothing stays uninitialised
        return comp

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def forward(self, step: int, micro_batch: int, x: torch.Tensor) -> Forward:
        """Forward one micro-batch. ``x``: token ids (B, T) on the first stage (``StageSetup.batch``),
        else the activation received from the previous stage (B, T, C), as a wire tensor of the
        run's wire dtype (decompressed here to float32)."""
        x = compression.decompress(x).to(self.device, non_blocking=True)  # from the wire (host) or the dataset: once
        if not self.setup.is_first:
            x = x.detach().requires_grad_(True)  # (B, T, C)
        with devices.autocast(self.device, self.setup.compute_dtype):
            y = self.module(x, Randomness(self.setup.seed, step, micro_batch))  # (B, T, C) or (B, T, vocab)
        return Forward(step, micro_batch, x, y)

    def backward(self, fwd: Forward, g: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        """Backward one micro-batch, accumulating parameter gradients.

        ``g``: the targets (B, T) on the last stage, which backpropagates its loss divided by
        ``micro_batches``; else the gradient of the output received from the next stage (B, T, C), a
        wire tensor (decompressed here: straight-through, the compressed gradient is backpropagated).
        Returns (the micro-batch's unscaled loss, 0.0 except on the last stage; the input gradient
        to send back (B, T, C), None on the first stage)."""
        loss_value = 0.0
        g = compression.decompress(g).to(self.device, non_blocking=True)
        if self.setup.is_last:
            loss = StageModule.loss(fwd.y.float(), g)  # the loss in float32 whatever the compute dtype
            loss_value = float(loss.detach())
            (loss / self.setup.micro_batches).backward()
        else:
            fwd.y.backward(g.to(fwd.y.dtype))
        if self.setup.is_first:
            return loss_value, None
        assert fwd.x.grad is not None
        return loss_value, fwd.x.grad.detach()  # (B, T, C)

    def grad_sq_norm(self) -> float:
        """This stage's share of the squared global gradient norm (what its StepReport claims)."""
        return grad_sq_norm(self.module)

    def update(self, global_norm: float, lr: float) -> None:
        """The optimizer step: clip by the global norm over all stages, step AdamW, drop the gradients."""
        clip_and_step(self.module, self.opt, global_norm, lr, self.setup.optim.grad_clip)

    def update_bounds(self, global_norm: float, lr: float, slack: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``update_bounds`` for this stage's accumulated gradients (call before ``update``)."""
        return update_bounds(self.module, self.opt, global_norm, lr, self.setup.optim.grad_clip, slack)

    def zero_grad(self) -> None:
        """Drop accumulated gradients (an aborted or restarted step)."""
        self.opt.zero_grad(set_to_none=True)

    def state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of the weights and optimizer state, in digest order; views, not copies."""
        return named_state(self.module, self.opt)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of ``state()`` that later steps do not change (on the device)."""
        return {name: t.clone() for name, t in self.state()}

    def digest(self) -> bytes:
        """The digest of ``state()``: what a node commits to."""
        return state_digest(self.state())

    @staticmethod
    def seeded_digest(setup: StageSetup) -> bytes:
        """The digest of the stage at the run seed's initial weights: what every holder of it must
        commit to at step 0 (the coordinator and ``pipeguard verify`` recompute it)."""
        return StageComputation.build(setup).digest()

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Replace weights and optimizer state with ``state`` (names as ``state()``), dropping gradients."""
        self.zero_grad()
        load_named_state(self.module, self.opt, state)


def to_wire(t: "torch.Tensor | Packed | None", wire_dtype: str = "fp32") -> "torch.Tensor | Packed | None":
    """What an output becomes at the wire under the run's ``wire_dtype``
    (``compression.compress``): detached, contiguous, in host memory; for fp32, float32 (a no-op
    for a float32 CPU tensor; one device-to-host copy otherwise), for int8 a ``Packed`` layout.
    A wire tensor of that dtype (an attacker's, already compressed) comes back unchanged."""
    if t is None:
        return None
    return compression.compress(t, wire_dtype)


# -- the honest range of an update ---------------------------------------------------------------


def adam_step_cap(beta1: float, beta2: float, t: int) -> float:
    """The largest |m_hat / sqrt(v_hat)| AdamW can produce at step ``t`` (1-based), whatever the
    gradients: by Cauchy-Schwarz over the moments' weights (1 at t = 1, ~1.165 for betas 0.9/0.95
    as t grows). An element's step is at most lr x this, plus its weight decay."""
    bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
    r = beta1 * beta1 / beta2
    series = t if r == 1.0 else (1.0 - r ** t) / (1.0 - r)
    return math.sqrt((1.0 - beta1) ** 2 / bc1 ** 2 * bc2 / (1.0 - beta2) * series)


def update_bounds(module: torch.nn.Module, opt: torch.optim.Optimizer, global_norm: float, lr: float, clip: float,
                  slack: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per element, in float64, the range [lo, hi] of every new weight and AdamW moment (named as
    ``named_state``) over all gradients ``g'`` with ``|g' - g| <= slack * (|g| + rms(g))`` per
    element, ``g`` being the gradients accumulated in ``module`` now, after the global-norm clip
    that ``clip_and_step`` applies, and ``rms`` over the whole stage.

    This is what an honest recomputation may produce when its gradients differ in the last bits
    (another thread count, another kernel): AdamW divides by sqrt(v), so where a gradient and its
    history are tiny next to the stage's gradients (e.g. a bias that the loss does not depend on),
    such a difference moves the step by up to a whole lr. The range is the box spanned by the
    moments' extremes, each weight's step clamped to ``adam_step_cap`` x lr (plus decay)."""
    params = sorted(module.named_parameters())
    grads = {n: p.grad.detach().double() for n, p in params if p.grad is not None}
    coef = clip / (global_norm + 1e-6) if clip > 0 and global_norm > clip else 1.0
    count = sum(g.numel() for g in grads.values())
    rms = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()) / count) * coef if count else 0.0
    group_of = {id(p): grp for grp in opt.param_groups for p in grp["params"]}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, p in params:
        if name not in grads:
            continue
        grp = group_of[id(p)]
        beta1, beta2 = grp["betas"]
        eps, wd = grp["eps"], grp["weight_decay"]
        g = grads[name] * coef
        e = slack * (g.abs() + rms)
        lo_g, hi_g = g - e, g + e
        st = opt.state.get(p, {})
        m = st["exp_avg"].detach().double() if "exp_avg" in st else torch.zeros_like(g)
        v = st["exp_avg_sq"].detach().double() if "exp_avg_sq" in st else torch.zeros_like(g)
        t = int(st["step"]) + 1 if "step" in st else 1
        bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
        m_lo, m_hi = beta1 * m + (1 - beta1) * lo_g, beta1 * m + (1 - beta1) * hi_g
        sq_hi = torch.maximum(lo_g.pow(2), hi_g.pow(2))
        sq_lo = torch.where((lo_g <= 0) & (hi_g >= 0), torch.zeros_like(g), torch.minimum(lo_g.pow(2), hi_g.pow(2)))
        v_lo, v_hi = beta2 * v + (1 - beta2) * sq_lo, beta2 * v + (1 - beta2) * sq_hi
        d_lo, d_hi = (v_lo / bc2).sqrt() + eps, (v_hi / bc2).sqrt() + eps
        corners = torch.stack([m_lo / d_lo, m_lo / d_hi, m_hi / d_lo, m_hi / d_hi]) / bc1
        cap = adam_step_cap(beta1, beta2, t)
        u_lo, u_hi = corners.min(0).values.clamp(-cap, cap), corners.max(0).values.clamp(-cap, cap)
        decayed = p.detach().double() * (1 - lr * wd)
        out[f"param/{name}"] = (decayed - lr * u_hi, decayed - lr * u_lo)
        out[f"optim/{name}/exp_avg"] = (m_lo.reshape(-1), m_hi.reshape(-1))
        out[f"optim/{name}/exp_avg_sq"] = (v_lo.reshape(-1), v_hi.reshape(-1))
    return out
