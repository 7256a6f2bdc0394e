"""Training data: byte-level text, identical on every node, batches a pure function of the step.

The coordinator builds the dataset (by default from the Python standard library's own
sources, which every Python install carries; or from ``--data PATH``) and nodes fetch it by
digest, so every party holds the same bytes whatever its Python version. The batch for
(step, micro-batch) is drawn from a generator seeded by (run seed, step, micro-batch): any
party can reconstruct any micro-batch's tokens.

Validation data is chosen by a hash of the file path (or of the chunk index for a user
file), never "the last 10%": the standard library sorted by path ends in codec tables.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeguard.model import derive_seed

log = logging.getLogger(__name__)

USER_CHUNK_BYTES = 64 * 1024
VAL_FRACTION_PER_MILLE = 50  # 5%


def _is_val(key: str) -> bool:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 1000 < VAL_FRACTION_PER_MILLE


@dataclass
class Dataset:
    """Training bytes followed by validation bytes, and where the second part starts."""

    blob: bytes
    val_offset: int

    def __post_init__(self) -> None:
        if not 0 < self.val_offset < len(self.blob):
            raise ValueError("dataset needs both training and validation bytes")
        self._tokens = torch.frombuffer(bytearray(self.blob), dtype=torch.uint8)

    @property
    def digest(self) -> bytes:
        h = hashlib.sha256(b"pipeguard-data\x00" + struct.pack(">Q", self.val_offset))
        h.update(self.blob)
        return h.digest()

    @property
    def train_bytes(self) -> int:
        return self.val_offset

    @property
    def val_bytes(self) -> int:
        return len(self.blob) - self.val_offset

    def batch(self, seed: int, step: int, micro_batch: int, batch_size: int, seq_len: int,
              split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and next-token targets, each (B, T) int64, for one micro-batch."""
        lo, hi = (0, self.val_offset) if split == "train" else (self.val_offset, len(self.blob))
        span = hi - lo - seq_len - 1
        if span <= 0:
            raise ValueError(f"{split} split ({hi - lo} bytes) is shorter than one sequence ({seq_len + 1})")
        g = torch.Generator()
        g.manual_seed(derive_seed(seed, "batch", split, step, micro_batch))
        starts = torch.randint(0, span, (batch_size,), generator=g) + lo  # (B,)
        idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]  # (B, T+1)
        window = self._tokens[idx].to(torch.int64)  # (B, T+1)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(struct.pack(">Q", self.val_offset) + self.blob)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Dataset":
        raw = path.read_bytes()
        (val_offset,) = struct.unpack(">Q", raw[:8])
        return cls(blob=raw[8:], val_offset=val_offset)


def stdlib_corpus(max_bytes: int) -> Dataset:
    """Up to ``max_bytes`` of the standard library's ``.py`` sources (no tests)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
        and "idlelib" not in p.parts
    ]
    # Order by a hash of the path, not the path: a prefix of the sorted list is one package.
    files.sort(key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).digest())
    train, val, total = [], [], 0
    for p in files:
        try:
            text = p.read_bytes()
        except OSError:
            continue
        if total + len(text) > max_bytes:
            continue
        (val if _is_val(str(p.relative_to(root))) else train).append(text)
        total += len(text)
    if not train or not val:
        raise RuntimeError(f"could not build a corpus from {root}")
    t, v = b"".join(train), b"".join(val)
    log.info("standard-library corpus: %d files, %d train + %d validation bytes", len(train) + len(val), len(t), len(v))
    return Dataset(blob=t + v, val_offset=len(t))


def text_file_corpus(path: Path) -> Dataset:
    """A user's text file, split into 64 KiB chunks; a hash of the chunk index picks validation."""
    raw = Path(path).read_bytes()
    chunks = [raw[i : i + USER_CHUNK_BYTES] for i in range(0, len(raw), USER_CHUNK_BYTES)]
    train = [c for i, c in enumerate(chunks) if not _is_val(f"chunk{i}")]
    val = [c for i, c in enumerate(chunks) if _is_val(f"chunk{i}")]
    if not val:  # small files: hold out the last chunk's second half
        last = train.pop() if train else b""
        train.append(last[: len(last) // 2])
        val = [last[len(last) // 2 :]]
    t, v = b"".join(train), b"".join(val)
    if len(t) < 2 or len(v) < 2:
        raise ValueError(f"{path} is too small to train on ({len(raw)} bytes)")
    return Dataset(blob=t + v, val_offset=len(t))


def load_dataset(path: str | None, max_bytes: int) -> Dataset:
    return text_file_corpus(Path(path)) if path else stdlib_corpus(max_bytes)
