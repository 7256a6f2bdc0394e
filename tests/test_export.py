"""The exported model file: shape recorded beside the weights, older bare files still load."""

from __future__ import annotations

import pytest
import torch

from pipeguard.app import export
from pipeguard.app.cli import main
from pipeguard.model import GPT, GPTConfig

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

SHAPE = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_export_file_round_trips_and_samples(tmp_path, capsys):
    model = GPT(SHAPE, seed=1)
    path = tmp_path / "model.pt"
    export.save(path, model.state_dict(), SHAPE, run_id="run-x", step=3)
    raw = torch.load(path, weights_only=True)
    assert raw["config"]["n_head"] == 2 and raw["run_id"] == "run-x" and raw["step"] == 3
    loaded, gpt, notes = export.load(path)
    assert gpt == SHAPE and notes == []
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # A prompt longer than the context is fine: generation looks at the last block_size bytes.
    text = export.sample(loaded, b"x" * 40, tokens=10, seed=1)
    assert text[:40] == b"x" * 40 and len(text) == 50
    assert export.sample(loaded, b"", tokens=5, seed=1) == export.sample(loaded, b"", tokens=5, seed=1)
    with pytest.raises(ValueError, match="n_head=2"):
        export.load(path, n_head=4)

    assert main(["sample", "--model", str(path), "--prompt", "héllo", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("héllo")


def test_a_bare_state_dict_loads_with_a_preset_and_the_head_count(tmp_path, capsys):
    model = GPT(SHAPE, seed=1)
    path = tmp_path / "old.pt"
    torch.save(model.state_dict(), path)  # what `pipeguard export` wrote before it recorded the shape
    with pytest.raises(ValueError, match="give --preset"):
        export.load(path)
    loaded, gpt, notes = export.load(path, "tiny", n_head=2)
    assert gpt == GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32) and "read off its tensors" in notes[0]
    assert main(["sample", "--model", str(path), "--tokens", "4"]) == 1
    assert "give --preset" in capsys.readouterr().err
    assert main(["sample", "--model", str(path), "--preset", "tiny", "--n-head", "2", "--tokens", "4"]) == 0
    assert "records no model shape" in capsys.readouterr().err
