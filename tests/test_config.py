"""The run-config schema: validation messages, and agreement with pyproject.toml."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import tomllib

from fedprime_core.config import (
    CACHED_OBJECTS,
    OPTIONS,
    PROFILE_VALUES,
    RESUMABLE_KEYS,
    ConfigError,
    RunConfig,
    cache_key,
    config_to_dict,
    load_yaml_config,
    parse_run_config,
    replace,
)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_parse_and_round_trip():
    cfg = parse_run_config({})
    assert cfg.method == "fedprime" and cfg.tau == 20 and cfg.kappa == 5 and cfg.lambda_reg == 0.01
    assert parse_run_config(config_to_dict(cfg)) == cfg


def test_run_config_class_is_the_options_table():
    fields = dataclasses.fields(RunConfig)
    hints = typing.get_type_hints(RunConfig)
    assert [f.name for f in fields] == [o.attr for o in OPTIONS]
    for option, field in zip(OPTIONS, fields):
        default = PROFILE_VALUES["paper"][option.key] if option.profile else option.default
        assert hints[field.name] is option.type, field.name
        assert field.default == default and type(field.default) is type(default), field.name
    assert RunConfig() == parse_run_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().seed = 1  # type: ignore[misc]


def test_cache_keys_and_resumable_keys_come_from_the_table():
    assert all(set(o.affects) <= set(CACHED_OBJECTS) for o in OPTIONS)
    # shard, server-eval and model are built from the splits and the backbone: whatever changes
    # those changes them too.
    for option in OPTIONS:
        if {"splits", "backbone"} & set(option.affects):
            assert {"shard", "server-eval", "model"} <= set(option.affects), option.key
    cfg = parse_run_config({})
    assert cache_key(cfg, "shard") != cache_key(replace(cfg, eta=0.5), "shard")
    assert cache_key(cfg, "model") == cache_key(replace(cfg, eta=0.5), "model")
    assert cache_key(cfg, "backbone") != cache_key(replace(cfg, model="tiny-vilt", text_max_length=30), "backbone")
    # A key that decides what a cached object holds cannot change on resume (the results would mix two
    # experiments), except where the table says so: the device moves the same model.
    for option in OPTIONS:
        if option.resumable and option.affects:
            assert option.key == "device", option.key
    assert {"num-server-rounds", "resume", "device"} <= RESUMABLE_KEYS and "seed" not in RESUMABLE_KEYS
    with pytest.raises(KeyError, match="unknown cached object"):
        cache_key(cfg, "nothing")


def test_pyproject_app_config_matches_the_schema():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(table) == {o.key for o in OPTIONS}
    for option in OPTIONS:
        assert table[option.key] == option.default, f"{option.key}: run python scripts/sync_config_docs.py"
    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "server_app.app:app", "clientapp": "client_app.app:app"}


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"method": "fedx"}, "'method' = 'fedx' is not allowed; use one of: fedprime, fed-intra"),
        ({"tau": 0}, "'tau' = 0 must be at least 1"),
        ({"tau": "many"}, "'tau' = 'many' must be an integer"),
        ({"lr": 0}, "'lr' = 0.0 must be greater than 0"),
        ({"eta": 1.5}, "'eta' = 1.5 must be at most 1"),
        ({"server-eval": "yes"}, "'server-eval' = 'yes' must be true or false"),
        ({"kappa": 8, "tau": 4}, "'kappa' = 8 must not exceed 'tau' = 4"),
        ({"dataset": "food101"}, "'data-dir' is empty but dataset='food101' needs data"),
        ({"dataset": "food101", "data-dir": "/d", "classes": "a,,b"}, "empty class name"),
        ({"dataset": "food101", "data-dir": "/d", "classes": "a,b,a"}, "names 'a' more than once"),
        ({"dataset": "food101", "classes": "a,b", "num-classes": 3}, "'num-classes' = 3 disagrees"),
        ({"classes": "a,b"}, "the embedded dataset has its own classes"),
        ({"dataset": "mmimdb", "data-dir": "/d", "mmimdb-protocol": "top8"}, "'mmimdb-protocol' = 'top8'"),
        ({"taus": 3}, "unknown run config key(s): 'taus' (did you mean 'tau'?)"),
        ({"fault-plan": "x:nan"}, "'fault-plan'"),
        ({"lr": float("nan")}, "finite"),
        ({"align-on": "keys"}, "'align-on' = 'keys' is not allowed; use one of: prompt, delta, usage"),
        ({"inter-merge": "position", "align-on": "delta"}, "'align-on' = 'delta' sets how the inter prompts"),
        ({"inter-merge": "position", "align-start": "cold"}, "inter-merge='align' (got method='fedprime'"),
        ({"method": "fed-intra", "align-start": "cold"}, "'align-start' = 'cold' sets how the inter prompts"),
        ({"method": "pfpt", "inter-init": "independent"}, "'inter-init' = 'independent' applies to methods"),
        ({"map-prompt-init": "reference"}, "which only fedavg-p has, not method='fedprime'; leave it at 'normal'"),
        ({"method": "fedavg-p", "map-prompt-init": "ones"}, "use one of: normal, reference"),
        ({"method": "fedavg-p", "readout": "first-prompt"}, "only methods with a retrieval pool"),
        ({"readout": "pooled"}, "use one of: cls, first-prompt"),
        ({"pooler-init": "random", "exchange-pooler": False}, "keep that random map frozen"),
        ({"pooler-init": "zeros"}, "use one of: pretrained, random"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(values, fragment):
    with pytest.raises(ConfigError) as info:
        parse_run_config(values)
    assert fragment in str(info.value)


def test_string_values_from_the_command_line_are_coerced():
    cfg = parse_run_config({"tau": "7", "lr": "0.1", "server-eval": "false"})
    assert (cfg.tau, cfg.lr, cfg.server_eval) == (7, 0.1, False)


def test_replace_validates_again():
    cfg = parse_run_config({})
    assert replace(cfg, tau=30, lambda_reg=0.5).lambda_reg == 0.5
    with pytest.raises(ConfigError):
        replace(cfg, kappa=50)


def test_yaml_files_map_onto_the_same_keys(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("method: fed-inter\nnum-server-rounds: 3\n")
    assert parse_run_config(load_yaml_config(good)).method == "fed-inter"
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [oops\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("num-server-round: 3\n")
    with pytest.raises(ConfigError, match="unknown run config key"):
        load_yaml_config(wrong)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml_config(tmp_path / "absent.yaml")


def test_the_configuration_page_documents_every_key():
    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = [o.key for o in OPTIONS if f"| `{o.key}` |" not in page]
    assert not missing, f"docs/configuration.md lacks: {missing}; run python scripts/sync_config_docs.py"


def test_both_configuration_tables_are_exactly_the_generated_ones():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_config_docs", ROOT / "scripts" / "sync_config_docs.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert "\n".join(sync.readme_table()) in page, "run python scripts/sync_config_docs.py"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "\n".join(sync.pyproject_table()) in pyproject, "run python scripts/sync_config_docs.py"


def test_comm_profile_sets_the_communication_keys_left_at_profile():
    from fedprime_core.config import PROFILE_VALUES, describe_communication, profile_keys

    assert profile_keys() == ("wire-dtype", "upload-delta", "query-rank", "exchange-pooler", "head-rank", "pooler-rank")
    paper, lean = parse_run_config({}), parse_run_config({"comm-profile": "lean"})
    for cfg, profile in ((paper, "paper"), (lean, "lean")):
        assert config_to_dict(cfg) | PROFILE_VALUES[profile] == config_to_dict(cfg)  # the effective values
        assert parse_run_config(config_to_dict(cfg)) == cfg  # config.json round-trips to the same run
    assert (lean.wire_dtype, lean.upload_delta, lean.query_rank, lean.exchange_pooler) == ("float16", True, 8, True)
    # What Flower passes: every key of pyproject.toml, the communication keys at "profile".
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert parse_run_config({**table, "comm-profile": "lean"}) == lean
    # A key given a value wins over the profile, whichever way; the description marks it.
    mixed = parse_run_config({**table, "comm-profile": "lean", "wire-dtype": "float32", "exchange-pooler": "false"})
    assert (mixed.wire_dtype, mixed.exchange_pooler, mixed.query_rank) == ("float32", False, 8)
    assert describe_communication(mixed) == (
        "comm-profile=lean: wire-dtype=float32*, upload-delta=true, query-rank=8, exchange-pooler=false*, "
        "head-rank=0, pooler-rank=0"
    )
    assert parse_run_config({"query-rank": "4"}).query_rank == 4
    # Changing the profile of a config resets the keys it sets, unless they are changed too.
    assert replace(paper, comm_profile="lean") == lean
    assert replace(lean, comm_profile="paper", query_rank=2).query_rank == 2


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"comm-profile": "tiny"}, "'comm-profile' = 'tiny' is not allowed; use one of: paper, lean, minimal"),
        ({"head-rank": -1}, "'head-rank' = -1 must be at least 0"),
        ({"pooler-rank": "some"}, "'pooler-rank' = 'some' must be an integer"),
        ({"wire-dtype": "int8"}, "'wire-dtype' = 'int8' is not allowed; use one of: profile, float32, float16"),
        ({"query-rank": -1}, "'query-rank' = -1 must be at least 0"),
        ({"query-rank": "low"}, "'query-rank' = 'low' must be an integer"),
        ({"exchange-pooler": "maybe"}, "'exchange-pooler' = 'maybe' must be true or false"),
        ({"upload-delta": 2}, "'upload-delta' = 2 must be true or false"),
    ],
)
def test_bad_communication_values_name_the_key(values, fragment):
    with pytest.raises(ConfigError) as info:
        parse_run_config(values)
    assert fragment in str(info.value)


def test_the_minimal_profile_sets_low_rank_head_and_pooler_on_top_of_lean():
    from fedprime_core.config import PROFILE_VALUES, describe_communication

    minimal, lean = parse_run_config({"comm-profile": "minimal"}), parse_run_config({"comm-profile": "lean"})
    assert (minimal.head_rank, minimal.pooler_rank) == (16, 8) and (lean.head_rank, lean.pooler_rank) == (0, 0)
    assert PROFILE_VALUES["minimal"] == {**PROFILE_VALUES["lean"], "head-rank": 16, "pooler-rank": 8}
    assert replace(minimal, comm_profile="lean") == lean
    assert parse_run_config(config_to_dict(minimal)) == minimal  # config.json round-trips to the same run
    assert describe_communication(parse_run_config({"comm-profile": "minimal", "head-rank": 32})).endswith(
        "head-rank=32*, pooler-rank=8"
    )
    # The pooler's update needs a trained pooler: a frozen one (exchange-pooler=false) must drop it.
    with pytest.raises(ConfigError, match="'pooler-rank' = 8 .*set pooler-rank=0 to freeze it"):
        parse_run_config({"comm-profile": "minimal", "exchange-pooler": "false"})
    frozen = parse_run_config({"comm-profile": "minimal", "exchange-pooler": "false", "pooler-rank": 0})
    assert (frozen.exchange_pooler, frozen.pooler_rank, frozen.head_rank) == (False, 0, 16)


@pytest.mark.parametrize(
    "overrides, before",
    [
        ({}, 10),
        ({"method": "fed-inter"}, 10),
        ({"inter-merge": "position"}, 50),
        ({"method": "pfpt"}, 50),
        ({"method": "fedavg-p"}, 50),
    ],
)
def test_runs_from_before_align_theta_steps_aligned_with_ten_steps(overrides, before):
    """A run folder without ``align-theta-steps``: 10 where the run aligned, else the key changed nothing."""
    from fedprime_core.config import stored_value
    from fedprime_core.tools.experiments.plan import stale_settings

    now = config_to_dict(parse_run_config(overrides))
    assert now["align-theta-steps"] == 50
    older = {k: v for k, v in now.items() if k != "align-theta-steps"}  # a config.json from before
    assert stored_value(older, "align-theta-steps") == before
    expected = [] if before == 50 else ["'align-theta-steps' (10 in the run folder, 50 in the grid)"]
    assert stale_settings(now, older) == expected
    assert stale_settings({**now, "align-theta-steps": 10}, older) == (
        [] if before == 10 else ["'align-theta-steps' (50 in the run folder, 10 in the grid)"]
    )


def test_align_theta_steps_must_be_positive():
    with pytest.raises(ConfigError, match="align-theta-steps"):
        parse_run_config({"align-theta-steps": 0})


def test_the_reference_prompt_init_is_a_fedavg_p_setting_and_old_runs_count_as_normal():
    from fedprime_core.config import stored_value

    assert parse_run_config({"method": "fedavg-p", "map-prompt-init": "reference"}).map_prompt_init == "reference"
    assert parse_run_config({"method": "fed-inter", "readout": "first-prompt"}).readout == "first-prompt"
    assert parse_run_config({"method": "fedavg-p", "pooler-init": "random"}).pooler_init == "random"
    assert stored_value({"method": "fedavg-p"}, "map-prompt-init") == "normal"  # runs before the key existed
