"""The exported model file: what ``pipeguard export`` writes and ``pipeguard sample`` reads.

An ordinary torch file holding ``{"config": {...}, "state_dict": {...}, "run_id": ..., "step": ...}``;
``config`` has ``pipeguard.model.GPTConfig``'s fields, and ``state_dict`` loads into
``GPT(GPTConfig(**config), seed)``. Files written before the config was recorded hold the bare
state dict: their shape is read off the tensors, except the head count (no tensor shows it),
which comes from a preset or ``n_head``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pipeguard.model import GPT, GPTConfig, preset


def save(path: str | Path, state_dict: dict[str, torch.Tensor], gpt: GPTConfig | None, **meta: object) -> None:
    payload: dict[str, object] = {"state_dict": state_dict, **meta}
    if gpt is not None:
        payload["config"] = dataclasses.asdict(gpt)
    torch.save(payload, path)


def infer_config(state_dict: dict[str, torch.Tensor], base: GPTConfig) -> GPTConfig:
    """The shape of a bare state dict: everything from its tensors but the head count (from ``base``)."""
    try:
        vocab_size, n_embd = state_dict["embed.wte.weight"].shape
        block_size = state_dict["embed.wpe.weight"].shape[0]
    except KeyError:
        raise ValueError("not a whole pipeguard GPT: the embedding is missing") from None
    n_layer = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    return dataclasses.replace(base, vocab_size=vocab_size, n_embd=n_embd, block_size=block_size, n_layer=n_layer)


def load(path: str | Path, preset_name: str | None = None, n_head: int | None = None) -> tuple[GPT, GPTConfig, list[str]]:
    """The model in ``path``, ready for sampling; plus notes on how its shape was decided."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    notes: list[str] = []
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj.get("config"), dict):
        state_dict, gpt = obj["state_dict"], GPTConfig(**obj["config"])
        if n_head is not None and n_head != gpt.n_head:
            raise ValueError(f"{path} records n_head={gpt.n_head}; --n-head {n_head} contradicts it")
        if preset_name is not None:
            wanted = preset(preset_name)
            if (wanted.n_layer, wanted.n_head, wanted.n_embd) != (gpt.n_layer, gpt.n_head, gpt.n_embd):
                notes.append(f"{path} records its own shape ({gpt.n_layer} layers, {gpt.n_head} heads, width "
                             f"{gpt.n_embd}); using that, not preset {preset_name!r}")
    else:
        state_dict = obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj
        if preset_name is None and n_head is None:
            raise ValueError(f"{path} records no model shape (exported by an older pipeguard): give --preset "
                             "(and --n-head if the run overrode the head count)")
        base = preset(preset_name or "tiny")
        gpt = infer_config(state_dict, dataclasses.replace(base, n_head=n_head or base.n_head))
        notes.append(f"{path} records no model shape: {gpt.n_layer} layers, width {gpt.n_embd}, context "
                     f"{gpt.block_size} read off its tensors, {gpt.n_head} heads from "
                     + ("--n-head" if n_head else f"preset {preset_name!r}"))
    model = GPT(dataclasses.replace(gpt, dropout=0.0), seed=0)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    return model, gpt, notes


def sample(model: GPT, prompt: bytes, tokens: int, temperature: float = 0.8, top_k: int | None = None,
           seed: int = 0) -> bytes:
    """``prompt`` continued by ``tokens`` sampled bytes (a newline stands in for an empty prompt)."""
    start = list(prompt) or [ord("\n")]
    idx = torch.tensor([start], dtype=torch.long)  # (1, T)
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k,
                         generator=torch.Generator().manual_seed(seed))  # (1, T + tokens)
    return bytes(out[0, len(start) - len(prompt):].tolist())
