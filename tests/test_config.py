"""Configuration: one loader merging defaults < TOML < environment < CLI, with errors that say how to fix."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from coordinator.config import CoordinatorConfig, DataConfig
from node.config import NodeConfig
from pipeguard.config import ConfigError, field_docs, load, to_toml

pytestmark = pytest.mark.unit


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_precedence_defaults_toml_env_cli(tmp_path):
    path = write(tmp_path, '[train]\nsteps = 10\nseed = 5\n[pipeline]\nstages = 2\n')
    env = {"PIPEGUARD_TRAIN_STEPS": "20", "PIPEGUARD_RUN_ID": "from-env"}

    assert load(CoordinatorConfig, environ={}).train.steps == 100
    assert load(CoordinatorConfig, path=path, environ={}).train.steps == 10
    cfg = load(CoordinatorConfig, path=path, environ=env)
    assert (cfg.train.steps, cfg.train.seed, cfg.run_id, cfg.pipeline.stages) == (20, 5, "from-env", 2)
    cfg = load(CoordinatorConfig, path=path, environ=env, cli={"train.steps": 30, "run_id": None})
    assert cfg.train.steps == 30, "CLI beats environment"
    assert cfg.run_id == "from-env", "a flag left unset (None) does not override"
    assert cfg.train.seed == 5 and cfg.train.lr == 3e-3, "untouched keys keep TOML values and defaults"


def test_environment_values_are_typed():
    env = {"PIPEGUARD_TRAIN_LR": "0.01", "PIPEGUARD_NET_MAX_TENSOR_BYTES": "2048",
           "PIPEGUARD_ATTACK_BEHAVIOURS": "forward:reverse,backward:noise", "PIPEGUARD_ATTACK_RATE": "0.5"}
    cfg = load(CoordinatorConfig, environ=env)
    assert cfg.train.lr == 0.01 and cfg.net.max_tensor_bytes == 2048
    node = load(NodeConfig, environ=env)
    assert node.attack.behaviours == ["forward:reverse", "backward:noise"] and node.attack.rate == 0.5


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(CoordinatorConfig, path=write(tmp_path, "[train]\nstep = 10\n"), environ={})
    msg = str(err.value)
    assert "'step'" in msg and "train" in msg
    assert "'steps'" in msg and "'micro_batches'" in msg, msg

    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['trian'\] in top level; valid keys: .*'train'"):
        load(CoordinatorConfig, path=write(tmp_path, "[trian]\nsteps = 1\n"), environ={})

    with pytest.raises(ConfigError, match="valid keys"):
        load(NodeConfig, cli={"net.bindd": "127.0.0.1:0"}, environ={})


@pytest.mark.parametrize(
    "toml, fragment",
    [
        ("[train]\nsteps = 0\n", "train.steps must be >= 1"),
        ('[train]\nsteps = "many"\n', "train.steps must be an integer"),
        ("[train]\nlr = true\n", "train.lr must be a number"),
        ("[train]\nlr = -1.0\n", "train.lr must be positive"),
        ("[net]\nbind = \"localhost\"\n", r"net.bind must be HOST:PORT \(e.g. 127.0.0.1:7000\)"),
        ("[net]\nchunk_bytes = 4194304\n", "must exceed net.chunk_bytes"),
        ("[timeouts]\nheartbeat_timeout = 1.5\n", "more than twice timeouts.heartbeat_interval"),
        ("[timeouts]\nrequest = 0\n", "timeouts.request must be positive"),
        ("[pipeline]\nstages = 9\n", "lower pipeline.stages or raise model.n_layer"),
        ("[registry]\nmax_nodes = 2\n", r"registry.max_nodes \(2\) must be at least pipeline.stages"),
        ("[registry]\nmax_nodes = 100000\n", "lower registry.max_nodes or raise net.max_message_bytes"),
        ('[model]\npreset = "huge"\n', "choose one of"),
        ("[model]\nn_embd = 30\n", "divisible by n_head"),
        ("train = 3\n", r"\[train\] must be a table"),
        ("[train\n", "is not valid TOML"),
    ],
)
def test_bad_coordinator_values_say_how_to_fix(tmp_path, toml, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load(CoordinatorConfig, path=write(tmp_path, toml), environ={})


@pytest.mark.parametrize(
    "cli, fragment",
    [
        ({"attack.behaviours": ["forward:flip"]}, r"unknown attack 'forward:flip'; choose from \["),
        ({"attack.rate": 1.5}, r"attack.rate must be in \[0, 1\]"),
        ({"attack.plugin": "evil.py"}, "attack.plugin must be PATH.py:ClassName"),
        ({"coordinator_key": "abcd"}, "64 hex characters"),
        ({"coordinator": "nowhere"}, "coordinator must be HOST:PORT"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"net.max_inflight_streams": 0}, "net.max_inflight_streams must be at least 1"),
    ],
)
def test_bad_node_values_say_how_to_fix(cli, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load(NodeConfig, cli=cli, environ={})


def test_bad_environment_value_names_the_key():
    with pytest.raises(ConfigError, match="train.steps must be an integer, got 'lots'"):
        load(CoordinatorConfig, environ={"PIPEGUARD_TRAIN_STEPS": "lots"})


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(CoordinatorConfig, path=tmp_path / "nope.toml", environ={})


@pytest.mark.parametrize(
    "cfg",
    [
        CoordinatorConfig(),
        load(CoordinatorConfig, environ={}, cli={"train.lr": 1e-5, "train.steps": 7, "run_id": "r-1",
                                                 "timeouts.heartbeat_interval": 0.25}),
        CoordinatorConfig(data=DataConfig(path='C:\\data\\"quoted" file.txt')),
        CoordinatorConfig(data=DataConfig(path="tab\there, newline\nthere, unicode é, bell \x07, del \x7f")),
        NodeConfig(),
        load(NodeConfig, environ={}, cli={"attack.behaviours": ["forward:reverse", "backward:noise"],
                                          "attack.rate": 0.3, "coordinator_key": "ab" * 32}),
    ],
    ids=["coordinator-defaults", "coordinator-overrides", "quotes-backslashes", "control-chars",
         "node-defaults", "node-attack"],
)
def test_to_toml_parses_back_to_the_same_values(cfg, tmp_path):
    text = to_toml(cfg)
    assert tomllib.loads(text) == dataclasses.asdict(cfg)
    path = write(tmp_path, text)
    assert load(type(cfg), path=path, environ={}) == cfg


def test_every_field_is_documented():
    for cls in (CoordinatorConfig, NodeConfig):
        undocumented = [key for key, _, _, doc in field_docs(cls)
                        if not doc and "." in key]  # top-level sections are documented by their class
        assert undocumented == [], f"{cls.__name__}: fields without a docstring: {undocumented}"


def test_stream_and_drain_bounds_are_config_with_todays_defaults():
    from pipeguard.config import NetConfig, TimeoutConfig  # noqa: PLC0415

    net, t = NetConfig(), TimeoutConfig()
    assert net.stream_slots_per_peer == 8 == NetConfig(peer_stream_slots=8).stream_slots_per_peer
    assert NetConfig(max_inflight_streams=3).stream_slots_per_peer == 1
    assert net.state_bytes_limit == 64 * net.max_tensor_bytes and net.max_state_tensors == 10_000
    assert (t.audit, t.retries, t.abort_wait) == (0.0, 5, 2.0)  # audit 0: sized per audit (tests/test_links.py)
    for bad in ({"peer_stream_slots": -1}, {"drain_bytes": -1}, {"max_state_tensors": 0}):
        with pytest.raises(ConfigError, match="net."):
            NetConfig(**bad)
    with pytest.raises(ConfigError, match="timeouts.retries"):
        TimeoutConfig(retries=0)
