"""Hyperparameter sweeps (hf_edit.evaluation.sweep): the table equals individual evaluate_model runs; grids; JSON;
the ``hf-edit sweep`` command in-process."""

from __future__ import annotations

import json
import math

import pytest
from tiny_models import tiny_model

from hf_edit import EditedModel, FTConfig, ROMEConfig
from hf_edit.errors import ConfigError
from hf_edit.evaluation import (
    EvalData,
    SweepResult,
    config_grid,
    evaluate_model,
    load_eval_data,
    parse_grid_values,
    sweep,
)

N_CASES = 3


@pytest.fixture(scope="module")
def cases(counterfact_path):
    return load_eval_data(counterfact_path, n=N_CASES)


@pytest.fixture
def rome(wikitext_path):
    return ROMEConfig(layers=1, mom2_dataset=str(wikitext_path), mom2_n_samples=100, mom2_max_length=32,
                      context_templates=("{}", "Hello world. {}"), v_num_grad_steps=3)


def _model(gpt2_tokenizer):
    return EditedModel(tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), seed=1), gpt2_tokenizer, progress=False)


def test_config_grid_is_the_cartesian_product(rome):
    grid = config_grid(rome, {"layers": [0, (1, 2)], "v_lr": [0.5, 1.0]})
    assert list(grid) == ["layers=0 v_lr=0.5", "layers=0 v_lr=1", "layers=1,2 v_lr=0.5", "layers=1,2 v_lr=1"]
    assert grid["layers=1,2 v_lr=1"].layers == (1, 2) and grid["layers=1,2 v_lr=1"].v_lr == 1.0
    assert grid["layers=0 v_lr=0.5"].mom2_n_samples == 100  # the base's other values are kept
    assert list(config_grid("ft", {"lr": [1e-3]})) == ["lr=0.001"]


@pytest.mark.parametrize("grid, fragment", [({"bogus": [1]}, "bogus"), ({"v_lr": []}, "non-empty"),
                                            ({"v_lr": [-1.0]}, "v_lr"), ({"v_lr": "0.5"}, "non-empty")])
def test_config_grid_rejects_bad_grids(rome, grid, fragment):
    with pytest.raises(ConfigError, match=fragment):
        config_grid(rome, grid)


def test_parse_grid_values():
    assert parse_grid_values("0,1,2") == [0, 1, 2]
    assert parse_grid_values("0.5, 1") == [0.5, 1]
    assert parse_grid_values("original,consistent") == ["original", "consistent"]
    assert parse_grid_values("true,false,null") == [True, False, None]
    assert parse_grid_values("[[0,1],[2]]") == [[0, 1], [2]]
    with pytest.raises(ConfigError):
        parse_grid_values("1,,2")


@pytest.mark.slow
def test_sweep_table_equals_individual_evaluations(gpt2_tokenizer, cases, rome, capsys):
    configs = config_grid(rome, {"layers": [0, 1]})
    configs["ft"] = FTConfig(layers=(1,), num_steps=2, lr=5e-3)
    model = _model(gpt2_tokenizer)
    result = sweep(model, cases, configs, progress=True)
    printed = capsys.readouterr()
    assert "ranked by S" in printed.out and "[3/3] ft" in printed.err
    assert [e.name for e in result.entries] == ["layers=0", "layers=1", "ft"]
    assert not model.edits  # the model is left as it was given

    for entry, config in zip(result.entries, configs.values()):
        alone = evaluate_model(_model(gpt2_tokenizer), cases, method=config, progress=False)
        assert entry.config == alone.method_config
        for metric in ("ES", "PS", "NS", "S", "EM", "PM", "NM"):
            assert entry.summary[metric]["mean"] == pytest.approx(alone.summary["post"][metric]["mean"], abs=1e-9)
            assert entry.summary[metric]["n"] == alone.summary["post"][metric]["n"] == N_CASES
        for metric in ("ES", "PS", "NS"):
            assert entry.summary[metric]["stderr"] == pytest.approx(alone.summary["post"][metric]["stderr"])
        assert entry.n_cases == N_CASES and entry.n_failed == 0 and entry.cases_per_second > 0
        assert entry.result is not None and entry.pre == alone.summary["pre"]

    # ROME's diagnostics are averaged over the successful edits.
    first = result.entries[0]
    infos = [next(iter(c["edit"]["info"].values())) for c in first.result.cases]
    assert first.diagnostics["v_steps"] == pytest.approx(sum(i["v_steps"] for i in infos) / N_CASES)
    assert 0 <= first.diagnostics["clamped"] <= 1

    ranked = result.ranked()
    scores = [e.score("S") for e in ranked]
    assert scores == sorted(scores, reverse=True) and result.best is ranked[0]
    table = result.table()
    lines = table.splitlines()
    assert lines[1].split()[:3] == ["#", "setting", "S"] and len(lines) == 2 + len(configs)
    assert lines[2].split()[1] == ranked[0].name and f"{N_CASES}/{N_CASES}" in lines[2]
    assert f"{ranked[0].summary['ES']['mean']:.1f} ± {ranked[0].summary['ES']['stderr']:.1f}" in lines[2]
    assert result.markdown().count("\n") == 1 + len(configs)


def test_sweep_json_round_trip_and_a_list_of_configs(gpt2_tokenizer, cases, rome, tmp_path):
    from dataclasses import replace

    configs = [rome, replace(rome, v_lr=1.0)]
    data = EvalData(cases=cases.cases[:2], data_format=cases.data_format, source=cases.source,
                    fingerprint=cases.fingerprint, n_total=cases.n_total)
    result = sweep(_model(gpt2_tokenizer), data, configs, progress=False, keep_results=False)
    assert [e.name for e in result.entries] == ["v_lr=0.5", "v_lr=1"]
    assert result.entries[0].overrides == {"v_lr": 0.5} and result.entries[0].result is None
    path = tmp_path / "sweep.json"
    text = result.to_json(path)
    assert json.loads(path.read_text()) == json.loads(text)
    back = SweepResult.from_json(path)
    assert back.table() == result.table() and back.best.name == result.best.name
    assert json.loads(text)["ranking"] == [e.name for e in result.ranked()]


def test_failed_edits_are_counted_and_can_be_scored_as_unedited(gpt2_tokenizer, cases, rome):
    from dataclasses import replace

    impossible = replace(rome, guard_max_relative_norm=0.0)  # the guard refuses every edit
    model = _model(gpt2_tokenizer)
    data = EvalData(cases=cases.cases[:2], data_format=cases.data_format, source=cases.source,
                    fingerprint=cases.fingerprint, n_total=cases.n_total)
    excluded = sweep(model, data, {"refused": impossible}, progress=False)
    entry = excluded.entries[0]
    assert entry.n_failed == 2 and entry.errors == {"DisablingEditError": 2} and entry.summary == {}
    assert math.isnan(entry.score("S")) and "0/2" in excluded.table()
    unedited = sweep(model, data, {"refused": impossible}, progress=False, failed="unedited")
    entry = unedited.entries[0]
    for metric in ("ES", "PS", "NS"):
        assert entry.summary[metric]["mean"] == pytest.approx(entry.pre[metric]["mean"])
    assert "2/2" in unedited.table() and "scored as unedited" in unedited.table()


def test_sweep_rejects_bad_arguments(gpt2_tokenizer, cases, rome):
    model = _model(gpt2_tokenizer)
    with pytest.raises(ConfigError, match="at least one"):
        sweep(model, cases, {}, progress=False)
    with pytest.raises(ConfigError, match="failed"):
        sweep(model, cases, [rome], failed="drop", progress=False)
    with pytest.raises(ConfigError):
        sweep(model, cases, "rome", progress=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, gpt2_tokenizer):
    folder = tmp_path_factory.mktemp("base")
    tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), seed=1).save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return folder


def test_sweep_command(base_dir, counterfact_path, wikitext_path, tmp_path, capsys):
    from hf_edit.cli import main

    out = tmp_path / "sweep.json"
    status = main(["sweep", "--model", str(base_dir), "--data", str(counterfact_path), "--start", "1", "--n", "1",
                   "--grid", "layers=0,1", "--grid", "v_lr=0.5,1", "--set", "v_num_grad_steps=2",
                   "--set", 'context_templates=["{}"]', "--set", "mom2_max_length=32", "--stats-data",
                   str(wikitext_path), "--stats-samples", "100", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "ranked by S" in printed and "best: " in printed and "layers=1 v_lr=0.5" in printed
    result = json.loads(out.read_text())
    assert len(result["entries"]) == 4 and result["data"]["n"] == 1
    assert {e["config"]["v_num_grad_steps"] for e in result["entries"]} == {2}
    assert {tuple(e["config"]["layers"]) for e in result["entries"]} == {(0,), (1,)}
    assert result["entries"][0]["n_cases"] == 1


@pytest.mark.parametrize("args, fragment", [
    (["--grid", "bogus=1,2"], "bogus"),
    (["--grid", "v_lr=a,b"], "v_lr"),
    (["--grid", "v_lr"], "KEY=V1,V2"),
    (["--grid", "v_lr=1", "--grid", "v_lr=2"], "twice"),
    (["--n", "0"], "--n must be positive"),
    (["--start", "5000"], "past the"),
])
def test_sweep_command_bad_input(args, fragment, base_dir, counterfact_path, capsys):
    from hf_edit.cli import main

    status = main(["sweep", "--model", str(base_dir), "--data", str(counterfact_path), *args, "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hf-edit: error: ") and fragment in lines[0], err
