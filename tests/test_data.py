"""Training data: deterministic batches, train/validation split, digests, files."""

from __future__ import annotations

import os

import pytest
import torch

from pipeguard.data import USER_CHUNK_BYTES, Dataset, text_file_corpus

pytestmark = pytest.mark.unit

TRAIN_BYTES, VAL_BYTES = 8192, 2048


@pytest.fixture(scope="module")
def ds() -> Dataset:
    """Training bytes all < 128 and validation bytes all >= 128, so any mix-up shows."""
    g = torch.Generator().manual_seed(0)
    train = bytes(torch.randint(0, 128, (TRAIN_BYTES,), generator=g, dtype=torch.uint8).tolist())
    val = bytes(torch.randint(128, 256, (VAL_BYTES,), generator=g, dtype=torch.uint8).tolist())
    return Dataset(blob=train + val, val_offset=TRAIN_BYTES)


def test_batch_is_deterministic_per_seed_step_and_micro_batch(ds):
    x, y = ds.batch(seed=1, step=3, micro_batch=2, batch_size=4, seq_len=32)
    x2, y2 = ds.batch(seed=1, step=3, micro_batch=2, batch_size=4, seq_len=32)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # a copy of the dataset (another node) draws the same batch
    x3, _ = Dataset(blob=ds.blob, val_offset=ds.val_offset).batch(1, 3, 2, 4, 32)
    assert torch.equal(x, x3)
    for other in [(2, 3, 2), (1, 4, 2), (1, 3, 1)]:
        assert not torch.equal(ds.batch(*other, batch_size=4, seq_len=32)[0], x), other


def test_batch_shapes_and_targets_are_inputs_shifted_by_one(ds):
    x, y = ds.batch(seed=1, step=0, micro_batch=0, batch_size=5, seq_len=16)
    assert x.shape == y.shape == (5, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        window = bytes(row_x + row_y[-1:])
        assert window in ds.blob, "every row is a contiguous window of the data"


@pytest.mark.parametrize("split", ["train", "val"])
def test_train_and_validation_splits_are_disjoint(ds, split):
    for step in range(20):
        x, y = ds.batch(seed=7, step=step, micro_batch=0, batch_size=8, seq_len=64, split=split)
        tokens = torch.cat([x, y])
        if split == "train":
            assert int(tokens.max()) < 128, "a training batch read validation bytes"
        else:
            assert int(tokens.min()) >= 128, "a validation batch read training bytes"


def test_sequence_longer_than_split_is_refused(ds):
    with pytest.raises(ValueError, match="shorter than one sequence"):
        ds.batch(seed=0, step=0, micro_batch=0, batch_size=1, seq_len=VAL_BYTES, split="val")


def test_digest_changes_with_content_and_split(ds):
    base = ds.digest
    assert Dataset(blob=ds.blob, val_offset=ds.val_offset).digest == base
    flipped = bytearray(ds.blob)
    flipped[100] ^= 1
    assert Dataset(blob=bytes(flipped), val_offset=ds.val_offset).digest != base
    assert Dataset(blob=ds.blob, val_offset=ds.val_offset + 1).digest != base
    assert Dataset(blob=ds.blob + b"x", val_offset=ds.val_offset).digest != base


@pytest.mark.parametrize("val_offset", [0, 10])
def test_dataset_needs_both_splits(val_offset):
    with pytest.raises(ValueError, match="both training and validation"):
        Dataset(blob=b"0123456789", val_offset=val_offset)


def test_save_load_round_trip(ds, tmp_path):
    path = tmp_path / "data.bin"
    ds.save(path)
    back = Dataset.load(path)
    assert back.blob == ds.blob and back.val_offset == ds.val_offset and back.digest == ds.digest
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_text_file_corpus_small_file(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(300)).encode()
    path = tmp_path / "small.txt"
    path.write_bytes(text)
    ds = text_file_corpus(path)
    assert ds.blob == text, "a one-chunk file keeps its bytes; the second half becomes validation"
    assert ds.val_offset == len(text) // 2
    assert text_file_corpus(path).digest == ds.digest
    x, _ = ds.batch(seed=0, step=0, micro_batch=0, batch_size=2, seq_len=32)
    assert bytes(x[0].tolist()) in text


def test_text_file_corpus_large_file_splits_by_whole_chunks(tmp_path):
    raw = os.urandom(40 * USER_CHUNK_BYTES + 123)
    path = tmp_path / "big.bin"
    path.write_bytes(raw)
    ds = text_file_corpus(path)
    chunks = [raw[i : i + USER_CHUNK_BYTES] for i in range(0, len(raw), USER_CHUNK_BYTES)]
    offsets = {ds.blob.find(c): c for c in chunks}
    assert -1 not in offsets, "a chunk of the file is missing from the dataset"
    assert b"".join(offsets[o] for o in sorted(offsets)) == ds.blob, "the dataset is the file's chunks, reordered"
    assert ds.val_offset in offsets, "validation starts on a chunk boundary"
    assert 0 < ds.val_bytes < len(raw) // 2
    assert text_file_corpus(path).digest == ds.digest


def test_text_file_corpus_refuses_tiny_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="too small"):
        text_file_corpus(path)
