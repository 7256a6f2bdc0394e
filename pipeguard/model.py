"""A byte-level GPT, and how it splits into pipeline stages.

Reads top to bottom like nanoGPT: config, small modules, then the stage module. The whole
model is simply the stage that covers everything (``GPT``), so the single-process model and
a pipeline stage share every line of code and every parameter name: the stage holding block
5 calls it ``blocks.5`` too, and the stages' state dicts merge into the model's.

Initialisation is per component: each embedding, block and head draws its weights from a
generator seeded by (run seed, component name), so a stage builds exactly its share of the
model without building the rest. Dropout masks come from (seed, step, micro-batch, layer),
all values in the signed tensor header, so any computation can be replayed exactly.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 64
    """Maximum sequence length (tokens)."""
    vocab_size: int = 256
    """Vocabulary size; 256 for byte-level text."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block."""
    n_embd: int = 64
    """Embedding width."""
    dropout: float = 0.0
    """Residual dropout probability (deterministic masks, see module docstring)."""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=64),
    "small": GPTConfig(block_size=256, n_layer=8, n_head=8, n_embd=256),
    "gpt2": GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768),
}


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# -- stage partitioning: a pure function of the config ---------------------------------------


@dataclass(frozen=True)
class StageSpec:
    index: int
    """Stage index, 0-based."""
    num_stages: int
    """Number of stages in the pipeline."""
    first_block: int
    """First transformer block held (inclusive)."""
    last_block: int
    """One past the last block held."""

    @property
    def has_embedding(self) -> bool:
        return self.index == 0

    @property
    def has_head(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def blocks(self) -> range:
        return range(self.first_block, self.last_block)


def partition(cfg: GPTConfig, num_stages: int) -> list[StageSpec]:
    """Split the model into contiguous stages: embeddings first, blocks evenly, head last.

    Blocks are spread as evenly as possible, earlier stages taking the remainder, so a
    stage never holds more than one block more than another.
    """
    if num_stages < 1:
        raise ValueError("num_stages must be >= 1")
    if num_stages > cfg.n_layer:
        raise ValueError(
            f"cannot split {cfg.n_layer} blocks into {num_stages} stages; use at most {cfg.n_layer} stages"
        )
    base, extra = divmod(cfg.n_layer, num_stages)
    specs, start = [], 0
    for i in range(num_stages):
        n = base + (1 if i < extra else 0)
        specs.append(StageSpec(index=i, num_stages=num_stages, first_block=start, last_block=start + n))
        start += n
    return specs


# -- deterministic randomness ----------------------------------------------------------------


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any values (stable across processes and machines)."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def _generator(*parts: object) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


@dataclass(frozen=True)
class Randomness:
    """Where a forward pass draws its dropout masks from: values in the signed header."""

    seed: int
    step: int
    micro_batch: int


def _dropout(x: torch.Tensor, p: float, rng: Randomness | None, layer: int, site: str) -> torch.Tensor:
    if p == 0.0 or rng is None:
        return x
    g = _generator(rng.seed, "dropout", rng.step, rng.micro_batch, layer, site)
    # Drawn on the host from a CPU generator, so that every device draws the same mask
    # (a CUDA generator's stream differs); one host-to-device copy per dropout site.
    keep = torch.rand(x.shape, generator=g) >= p
    return x * keep.to(device=x.device, dtype=x.dtype) / (1.0 - p)


# -- modules ---------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if q.is_cuda and torch.are_deterministic_algorithms_enabled():
            # The fused CUDA attention kernels' backward accumulates with atomics (not
            # reproducible); the math kernel is, at the cost of (B, nh, T, T) memory.
            with sdpa_kernel(SDPBackend.MATH):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.dropout = cfg.dropout
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rng: Randomness | None = None) -> torch.Tensor:
        x = x + _dropout(self.attn(self.ln_1(x)), self.dropout, rng, self.layer, "attn")  # (B, T, C)
        x = x + _dropout(self.mlp(self.ln_2(x)), self.dropout, rng, self.layer, "mlp")  # (B, T, C)
        return x


class Embedding(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)  # (T,)
        return self.wte(idx) + self.wpe(pos)  # (B, T, C)


class Head(nn.Module):
    """Final layer norm and the language-model head (not tied to the embedding: the two
    live on different stages)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


def _init_component(module: nn.Module, cfg: GPTConfig, seed: int, name: str) -> None:
    """nanoGPT's init, drawn from a generator owned by this component alone."""
    g = _generator(seed, "init", name)
    with torch.no_grad():
        for pname, p in module.named_parameters():
            if pname.endswith("bias"):
                p.zero_()
            elif ".ln_" in f".{pname}" or pname.startswith("ln_"):
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if pname.endswith("c_proj.weight") else 0.02
                p.normal_(0.0, std, generator=g)


class StageModule(nn.Module):
    """The part of the GPT that one pipeline stage holds.

    Input: token ids (B, T) for stage 0, else activations (B, T, C).
    Output: logits (B, T, vocab) for the last stage, else activations (B, T, C).
    """

    def __init__(self, cfg: GPTConfig, spec: StageSpec, seed: int, init: bool = True):
        """``init=False`` leaves the weights as torch's constructors make them (for a module whose
        every weight is loaded next, e.g. built on the meta device)."""
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        self.embed = Embedding(cfg) if spec.has_embedding else None
        self.blocks = nn.ModuleDict({str(i): Block(cfg, i) for i in spec.blocks})
        self.head = Head(cfg) if spec.has_head else None
        if not init:
            return
        if self.embed is not None:
            _init_component(self.embed, cfg, seed, "embed")
        for i, block in self.blocks.items():
            _init_component(block, cfg, seed, f"blocks.{i}")
        if self.head is not None:
            _init_component(self.head, cfg, seed, "head")

    def forward(self, x: torch.Tensor, rng: Randomness | None = None) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)  # (B, T, C)
        for block in self.blocks.values():
            x = block(x, rng)  # (B, T, C)
        if self.head is not None:
            x = self.head(x)  # (B, T, vocab)
        return x

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    def activation_shape(self, batch: int, seq: int) -> tuple[int, ...]:
        """Shape of the activation entering (and gradient leaving) this stage."""
        return (batch, seq, self.cfg.n_embd)


class GPT(StageModule):
    """The whole model in one process: the stage that holds everything."""

    def __init__(self, cfg: GPTConfig, seed: int):
        super().__init__(cfg, StageSpec(index=0, num_stages=1, first_block=0, last_block=cfg.n_layer), seed)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.cfg.block_size :]  # (B, <=T)
            logits = self(idx_cond)[:, -1, :] / temperature  # (B, vocab)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)  # (B, vocab)
            idx = torch.cat((idx, torch.multinomial(probs, 1, generator=generator)), dim=1)  # (B, T+1)
        return idx


# -- optimisation: shared by stages and the single-process reference ---------------------------


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 3e-3
    warmup_steps: int = 10
    total_steps: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0


def lr_at(step: int, o: OptimSettings) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, o.total_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * coeff)


def make_optimizer(module: nn.Module, o: OptimSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only, single-tensor kernels for reproducibility."""
    decay = [p for _, p in sorted(module.named_parameters()) if p.dim() >= 2]
    no_decay = [p for _, p in sorted(module.named_parameters()) if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        foreach=False,
    )


def warm_up_optimizer() -> threading.Thread:
    """Build a throwaway AdamW on a thread: torch imports its compiler stack the first time any
    optimizer is made (about a second of CPU here), which would otherwise land on a daemon's first
    stage assignment or first audit."""
    def build() -> None:
        torch.optim.AdamW([nn.Parameter(torch.zeros(1))], foreach=False)
    t = threading.Thread(target=build, name="pipeguard-warm-up", daemon=True)
    t.start()
    return t


def grad_sq_norm(module: nn.Module) -> float:
    """Sum over parameters of the squared L2 norm of each gradient, in float64."""
    total = 0.0
    for _, p in sorted(module.named_parameters()):
        if p.grad is not None:
            total += float(torch.linalg.vector_norm(p.grad.detach(), 2, dtype=torch.float64)) ** 2
    return total


def clip_and_step(module: nn.Module, opt: torch.optim.Optimizer, global_norm: float, lr: float, clip: float) -> None:
    """Scale gradients by the global-norm clip coefficient, then take one optimizer step."""
    if clip > 0 and global_norm > clip:
        coef = clip / (global_norm + 1e-6)
        for p in module.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)


def named_state(module: nn.Module, opt: torch.optim.Optimizer):
    """(name, tensor) pairs covering weights and optimizer state, in a fixed order."""
    names = {id(p): n for n, p in module.named_parameters()}
    for name, p in sorted(module.named_parameters()):
        yield f"param/{name}", p.detach()
    for p, st in sorted(((p, s) for p, s in opt.state.items()), key=lambda ps: names[id(ps[0])]):
        for key in sorted(st):
            v = st[key]
            if torch.is_tensor(v):
                yield f"optim/{names[id(p)]}/{key}", v.detach().reshape(-1)


def load_named_state(module: nn.Module, opt: torch.optim.Optimizer, named: dict[str, torch.Tensor]) -> None:
    """Inverse of ``named_state``: load weights (and AdamW state, when present) in place."""
    params = dict(module.named_parameters())
    expected = {f"param/{n}" for n in params}
    missing = expected - set(named)
    if missing:
        raise ValueError(f"state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            src = named[f"param/{name}"]
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(f"{name}: shape {tuple(src.shape)} does not match {tuple(p.shape)}")
            p.copy_(src)
    opt.state.clear()
    for name, p in params.items():
        keys = {k.rsplit("/", 1)[1]: v for k, v in named.items() if k.startswith(f"optim/{name}/")}
        if not keys:
            continue
        st = {}
        for key, v in keys.items():
            if v.numel() == p.numel() and key != "step":  # moments live with their parameter
                st[key] = v.to(p.device, copy=True).reshape(p.shape)
            else:  # AdamW's single-tensor step count stays on the host
                st[key] = v.to("cpu", copy=True).reshape(())
        opt.state[p] = st
