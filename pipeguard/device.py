"""Where a party computes: the device setting, its device class, the compute dtype.

Every party that computes a stage (a node, the coordinator's judge, ``pipeguard verify``) names
a device in its config: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when torch sees one,
else cpu). ``check`` validates the spelling (config time, no CUDA needed), ``resolve`` turns it
into a ``torch.device`` at start (ValueError with the fix when the machine lacks it), and
``device_class`` names the hardware for registration and audit planning: ``cpu`` or
``cuda:<device name>`` (e.g. ``cuda:NVIDIA H200``). Recomputations are bit-identical only
within one class (and one torch build and thread count); across classes an audit applies the
run's cross-device tolerance (docs/gpu.md).

CUDA determinism: cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when it creates its handle, so
``prepare`` sets it (unless the environment already does) before anything touches CUDA; the
importing of this module does it too. ``computation.Determinism`` turns on deterministic
algorithms and keeps TF32 off unless asked.

The compute dtype is a run setting (``TrainSpec.compute_dtype``, in every node's signed
assignment): ``fp32`` (default) or ``bf16`` (autocast of matmuls and attention to bfloat16;
weights and optimizer state stay float32). What activations and gradients travel as is a run
setting of its own (``TrainSpec.wire_dtype``, pipeguard/compression.py; float32 by default).
"""

from __future__ import annotations

import os
import re
from contextlib import nullcontext
from typing import ContextManager

import torch

CUBLAS_WORKSPACE = ":4096:8"
"""``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS (the CUDA docs' larger choice)."""
CHOICES = "cpu, cuda, cuda:N (N a GPU index) or auto (cuda when available, else cpu)"
_SPELLING = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""The compute dtypes a run may use (``train.compute_dtype``)."""


def prepare() -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` unless the environment has it: before any CUDA work."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


prepare()


def check(spec: str, what: str = "device") -> str:
    """``spec`` if it is a device setting; ValueError saying what is accepted otherwise."""
    if not isinstance(spec, str) or not _SPELLING.match(spec.strip().lower()):
        raise ValueError(f"{what} must be one of {CHOICES}; got {spec!r}")
    return spec.strip().lower()


def resolve(spec: str, what: str = "device") -> torch.device:
    """The ``torch.device`` a setting names on this machine; ValueError with the fix when this
    machine has no such device."""
    spec = check(spec, what)
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = f"torch {torch.__version__} built with CUDA {torch.version.cuda}" if torch.version.cuda \
            else f"torch {torch.__version__} is a CPU-only build"
        raise ValueError(f"{what} = {spec!r}, but torch sees no CUDA device here ({built}); "
                         f"set {what} = \"cpu\" or \"auto\", or install a CUDA build of torch on a machine with a GPU")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"{what} = {spec!r}, but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def device_class(device: torch.device) -> str:
    """The hardware class a device belongs to: ``cpu`` or ``cuda:<device name>``."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def compute_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``compute_dtype`` setting ("" = fp32); ValueError otherwise."""
    key = name or "fp32"
    if key not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {name!r}")
    return COMPUTE_DTYPES[key]


def autocast(device: torch.device, name: str) -> ContextManager:
    """The autocast context of a compute dtype on ``device`` (none for fp32)."""
    dtype = compute_dtype(name)
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory allocated on a CUDA device since start (0 on cpu)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0
