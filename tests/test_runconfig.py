"""pipeguard.app.runconfig: configs for tests and benchmarks, built from the dataclasses."""

from __future__ import annotations

import pytest

from coordinator.config import CoordinatorConfig
from node.config import NodeConfig
from pipeguard import config as pgconfig
from pipeguard.app.runconfig import build, flatten, node_config, replace, run_config, to_toml
from pipeguard.config import ConfigError
from tests.conftest import TINY, tiny_run

pytestmark = pytest.mark.unit


def read_back(cls, text, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return pgconfig.load(cls, path=path, environ={})


def test_overrides_apply_in_order_and_leave_the_rest_at_the_defaults():
    cfg = run_config({"train.steps": 4, "audit.rate": 1.0}, {"train.steps": 5}, run_id="r1", **{"net.chunk_bytes": 2048})
    assert (cfg.train.steps, cfg.audit.rate, cfg.run_id, cfg.net.chunk_bytes) == (5, 1.0, "r1", 2048)
    default = CoordinatorConfig()
    assert cfg.train.seed == default.train.seed and cfg.timeouts == default.timeouts


@pytest.mark.parametrize("key", ["audit.rat", "trian.steps", "steps", "train.steps.x", "train"])
def test_a_typo_is_an_error_that_lists_the_valid_keys(key):
    with pytest.raises(ConfigError, match="unknown CoordinatorConfig key") as info:
        run_config({key: 1})
    assert "train.steps" in str(info.value) or "audit.rate" in str(info.value)


def test_values_are_checked_as_the_daemons_check_a_file():
    with pytest.raises(ConfigError, match="audit.rate must be in"):
        run_config({"audit.rate": 2.0})
    with pytest.raises(ConfigError, match="must be an integer"):
        run_config({"train.steps": "four"})
    with pytest.raises(ConfigError, match="given None"):
        run_config({"train.steps": None})
    with pytest.raises(ConfigError, match="unknown attack"):
        node_config({"attack.behaviours": ["forward:nonsense"]})


def test_the_environment_does_not_leak_in(monkeypatch):
    monkeypatch.setenv("PIPEGUARD_TRAIN_STEPS", "99")
    assert run_config().train.steps == CoordinatorConfig().train.steps


def test_replace_changes_only_the_keys_given():
    cfg = tiny_run()
    changed = replace(cfg, {"pipeline.min_nodes": 4})
    assert changed.pipeline.min_nodes == 4 and cfg.pipeline.min_nodes == 0
    assert {k: v for k, v in flatten(changed).items() if k != "pipeline.min_nodes"} == \
        {k: v for k, v in flatten(cfg).items() if k != "pipeline.min_nodes"}


def test_to_toml_writes_what_differs_and_the_daemons_read_it_back(tmp_path):
    assert to_toml(CoordinatorConfig()) == "" and to_toml(NodeConfig()) == ""
    run = tiny_run({"audit.screen": False, "run_id": 'a "quoted" id', "data.path": "/tmp/x y.txt"})
    text = to_toml(run)
    assert text.startswith('run_id = "a \\"quoted\\" id"\n') and "screen = false" in text
    assert "[registry]" not in text  # untouched sections are left out
    assert read_back(CoordinatorConfig, text, tmp_path) == run
    node = node_config({"attack.behaviours": ["forward:reverse", "wire:replay"], "attack.micro_batches": [0, 2],
                        "attack.rate": 0.5, "timeouts.step": 15.0, "threads": 2})
    assert read_back(NodeConfig, to_toml(node), tmp_path) == node


def test_tiny_run_is_the_tests_base():
    assert flatten(tiny_run()).items() >= TINY.items()
    assert build(CoordinatorConfig, TINY) == tiny_run()
