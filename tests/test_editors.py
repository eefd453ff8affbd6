"""Editor networks as artifacts and their training: the matrices found per architecture, save / load / Hub,
the training data (evaluation cases excluded), training that lowers the loss deterministically, checkpoint →
resume giving the same next step, the CLI, and (slow) 2 processes through accelerate equal to 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fake_hub import fake_hub  # noqa: F401
from tiny_models import tiny_model

from hf_edit.editors import (
    EditorNetwork,
    EditorNetworkError,
    EditorTrainingConfig,
    find_edited_matrices,
    prepare_training_data,
    train_editor,
)
from hf_edit.errors import ConfigError, LayerOutOfRangeError
from hf_edit.evaluation import load_eval_data

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
pytestmark = pytest.mark.filterwarnings("ignore::hf_edit.errors.EditDidNotTakeWarning")


@pytest.fixture(scope="module")
def tokenizer(cf_facts_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cf_facts_path)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("editors_base")
    tiny_model("gpt2", vocab_size=len(tokenizer), n_positions=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cases(counterfact_path):
    return load_eval_data(counterfact_path, n=40)


@pytest.fixture(scope="module")
def locality(tmp_path_factory, wikitext_path):
    lines = [line for line in wikitext_path.read_text().splitlines() if len(line.strip()) > 80][:40]
    path = tmp_path_factory.mktemp("locality") / "text.raw"
    path.write_text("\n".join(lines))
    return path


def load(base_dir) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def quick(**overrides) -> EditorTrainingConfig:
    """A small, fast training configuration for the tiny model."""
    values = dict(network={"rank": 16}, batch_size=4, micro_batch_size=1, max_steps=3, lr=1e-3, val_size=2,
                  loc_max_length=24, norm_warmup=4, eval_every=0, checkpoint_every=0, log_every=1, select="last",
                  log_with=())
    values.update(overrides)
    return EditorTrainingConfig(**values)


def weights(network: EditorNetwork) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0,
                        rtol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


# -- matrices and artifact -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type,expected", [
    ("gpt2", ["mlp.c_fc", "mlp.c_proj"]),
    ("llama", ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    ("gptj", ["mlp.fc_in", "mlp.fc_out"]),
    ("gpt_neox", ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    ("opt", ["fc1", "fc2"]),
    ("phi", ["mlp.fc1", "mlp.fc2"]),
])
def test_the_last_three_layers_mlp_matrices_per_architecture(model_type, expected):
    model = tiny_model(model_type)
    matrices = find_edited_matrices(model, layers=(-1,))
    assert [m.name.split(".", 3 if model_type != "opt" else 4)[-1] for m in matrices] == expected
    assert all(m.layer == 2 for m in matrices)
    assert {m.layer for m in find_edited_matrices(model)} == {0, 1, 2}
    with pytest.raises(LayerOutOfRangeError):
        find_edited_matrices(model, layers=(5,))
    named = find_edited_matrices(model, modules=[matrices[-1].name])
    assert named == matrices[-1:]


def test_artifact_round_trip_card_and_hub(base_dir, tmp_path, fake_hub):  # noqa: F811
    model = load(base_dir)
    for kind, config in (("mend", {"rank": 16}), ("ke", {"hidden_dim": 8, "condition_dim": 8, "lstm_hidden": 8})):
        network = EditorNetwork.create(kind, model, layers=(2,), config=config)
        if kind == "mend":
            network.observe({m.name: _random_factors(m) for m in network.matrices})
        folder = network.save_pretrained(tmp_path / kind)
        assert {p.name for p in folder.iterdir()} == {"editor_config.json", "editor.safetensors", "README.md"}
        described = json.loads((folder / "editor_config.json").read_text())
        assert described["kind"] == kind and described["base_model"]["fingerprint"] == network.base_model.fingerprint
        assert described["base_model"]["name_or_path"] == str(base_dir)
        card = (folder / "README.md").read_text()
        assert network.base_model.fingerprint in card and kind.upper() in card and "editor-network" in card
        loaded = EditorNetwork.from_pretrained(folder)
        assert type(loaded) is type(network) and loaded.matrices == network.matrices
        assert loaded.config == network.config and loaded.base_model == network.base_model
        assert_same_weights(weights(loaded), weights(network))
        loaded.check_base_model(model)
        url = network.push_to_hub(f"user/{kind}-tiny")
        assert "user" in url
        from_hub = EditorNetwork.from_pretrained(f"user/{kind}-tiny")
        assert_same_weights(weights(from_hub), weights(network))
        assert "README.md" in fake_hub.files(f"user/{kind}-tiny")
    with pytest.raises(EditorNetworkError, match="holds a MEND"):
        type(EditorNetwork.from_pretrained(tmp_path / "ke")).from_pretrained(tmp_path / "mend")
    with pytest.raises(EditorNetworkError):
        EditorNetwork.from_pretrained(tmp_path)


def _random_factors(matrix):
    from hf_edit.editors import GradientFactors

    generator = torch.Generator().manual_seed(0)
    return GradientFactors(torch.randn(6, matrix.in_features, generator=generator),
                           torch.randn(6, matrix.out_features, generator=generator))


# -- data ----------------------------------------------------------------------------------------------------------
def test_training_data_excludes_evaluation_cases(cases, locality, tokenizer):
    evaluation = replace(cases, cases=cases.cases[:10])
    data = prepare_training_data(cases, locality=locality, exclude=evaluation, val_size=5)
    assert data.n_excluded == 10 and len(data.train) + len(data.val) == 30
    used = {e.request.case_id for e in data.train + data.val}
    assert not used & {c.case_id for c in evaluation.cases}
    by_ids = prepare_training_data(cases, locality=locality, exclude=[c.case_id for c in cases.cases[:3]])
    assert by_ids.n_excluded == 3 and by_ids.describe()["n_excluded_by_case_id"] == 3
    # the same fact under another case id is caught by its prompt
    renamed = [replace(c, request=replace(c.request, case_id=10_000 + i)) for i, c in enumerate(cases.cases[:4])]
    clash = prepare_training_data(renamed + list(cases.cases[10:20]), locality=locality, exclude=evaluation,
                                  val_size=0)
    assert clash.n_excluded == 4 and clash.describe()["n_excluded_by_prompt"] == 4
    assert data.fingerprint != by_ids.fingerprint and data.fingerprint.startswith("sha256:")
    assert data.train[0].paraphrases and len(data.locality) == 40
    # a training edit's neighbourhood prompt that is an evaluation prompt is dropped
    leaky = replace(cases.cases[20], neighborhood_prompts=(cases.cases[0].paraphrase_prompts[0], "Fine prompt of"))
    kept = prepare_training_data([leaky, *cases.cases[21:30]], locality=locality, exclude=evaluation, val_size=0)
    assert kept.train[0].neighbours == ("Fine prompt of",) and kept.describe()["n_neighbour_prompts_dropped"] == 1
    # with loc_neighbours, an edit's neighbourhood prompts join its locality rows
    from hf_edit.editors.training import _Batches

    batches = _Batches(kept, tokenizer, True, micro_batch_size=1, n_loc=1, seed=0, max_length=None,
                       loc_max_length=8, loc_neighbours=2)
    micro = batches.build([(kept.train[1], 3)], ["Some unrelated text."])
    assert micro.loc.input_ids.shape[0] == 3  # 1 text + 2 neighbourhood prompts
    neighbour = tokenizer(kept.train[1].neighbours[3])["input_ids"][:8]
    assert micro.loc.input_ids[1, :len(neighbour)].tolist() == neighbour


# -- training ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mend", "ke"])
def test_training_lowers_the_loss_and_is_deterministic(kind, base_dir, tokenizer, cases, locality, tmp_path):
    network = {"rank": 16} if kind == "mend" else {"hidden_dim": 16, "condition_dim": 16, "lstm_hidden": 16}
    config = quick(network=network, max_steps=6, lr=1e-3 if kind == "mend" else 3e-3)
    runs = []
    for name in ("a", "b"):
        result = train_editor(kind, load(base_dir), tokenizer, cases, output_dir=tmp_path / name, config=config,
                              locality_data=locality, exclude=replace(cases, cases=cases.cases[6:]), progress=False)
        runs.append(result)
    a, b = runs
    assert a.steps == 6 and a.examples_seen == 24 and a.stopped == "max_steps"
    assert a.data["n_excluded"] == 34 and a.data["n_train"] == 4 and a.data["n_val"] == 2
    assert_same_weights(weights(a.editor), weights(b.editor))  # same seed, same data: bitwise the same network
    log = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in log if "train/loss" in r]
    # every step sees the same 4 training edits (batch_size 4), so the training loss is comparable across steps
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert any("val/es_rewrite" in r for r in log)
    saved = EditorNetwork.from_pretrained(tmp_path / "a")
    assert saved.training_info["n_excluded"] == 34 and saved.training_info["steps"] == 6
    assert saved.training_info["data_fingerprint"] == a.data["data_fingerprint"]


def test_checkpoint_then_resume_gives_the_same_next_step(base_dir, tokenizer, cases, locality, tmp_path):
    common = dict(tokenizer=tokenizer, train_data=cases, locality_data=locality, progress=False)
    config = quick(checkpoint_every=2, n_loc=2)
    first = train_editor("mend", load(base_dir), output_dir=tmp_path / "run", config=config, **common)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000002",
                                                                                    "step-00000003"]
    # from the step-2 checkpoint, step 3 again (another output folder): the same network
    again = train_editor("mend", load(base_dir), output_dir=tmp_path / "again", config=config,
                         resume_from=tmp_path / "run" / "checkpoints" / "step-00000002", **common)
    assert again.steps == 3 and again.examples_seen == 12
    assert_same_weights(weights(again.editor), weights(first.editor))
    # continue the first run to step 5 ("latest"), and train 5 steps from scratch: the same network
    resumed = train_editor("mend", load(base_dir), output_dir=tmp_path / "run", config=replace(config, max_steps=5),
                           resume_from="latest", **common)
    fresh = train_editor("mend", load(base_dir), output_dir=tmp_path / "fresh", config=replace(config, max_steps=5),
                         **common)
    assert resumed.steps == fresh.steps == 5
    assert_same_weights(weights(resumed.editor), weights(fresh.editor))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(3) == 2  # train and val records; nothing logged twice
    with pytest.raises(ConfigError, match="another run"):
        train_editor("mend", load(base_dir), output_dir=tmp_path / "run", config=replace(config, lr=1e-2),
                     resume_from="latest", **common)


def test_time_budget_and_best_selection(base_dir, tokenizer, cases, locality, tmp_path):
    config = quick(max_steps=1000, max_time_s=1e-3, eval_every=1, select="best")
    result = train_editor("mend", load(base_dir), tokenizer, cases, output_dir=tmp_path / "out", config=config,
                          locality_data=locality, progress=False)
    assert result.stopped == "max_time" and result.steps == 1
    assert result.editor.training_info["selected"] == "best" and not (tmp_path / "out" / "best").exists()
    assert "val/loss" in result.editor.training_info["final_metrics"]
    # a finished run continues from its last checkpoint (its best network was already moved to the folder)
    more = train_editor("mend", load(base_dir), tokenizer, cases, output_dir=tmp_path / "out",
                        config=replace(config, max_time_s=None, max_steps=2), locality_data=locality,
                        resume_from="latest", progress=False)
    assert more.steps == 2 and more.stopped == "max_steps" and more.editor.training_info["selected"] == "best"


def test_cli_trains_an_editor_and_edits_with_it(base_dir, counterfact_path, locality, tmp_path, capsys):
    from hf_edit.cli import main

    records = json.loads(counterfact_path.read_text())
    (tmp_path / "eval.json").write_text(json.dumps(records[:2]))
    out = tmp_path / "mend"
    assert main(["train-editor", "--method", "mend", "--model", str(base_dir), "--data", str(counterfact_path),
                 "--n-train", "12", "--locality", str(locality), "--exclude", str(tmp_path / "eval.json"),
                 "--out", str(out), "--no-progress", "--set", "max_steps=2", "--set", "batch_size=2",
                 "--set", 'network={"rank": 8}', "--set", "val_size=2", "--set", "loc_max_length=16",
                 "--set", "log_with=[]"]) == 0
    shown = capsys.readouterr().out
    assert "2 excluded as evaluation cases" in shown and "saved the editor network" in shown
    assert main(["edit", "--model", str(base_dir), "--method", "mend", "--set", f"editor={out}", "--prompt",
                 "{} is located in", "--subject", "Paris", "--target", "Rome", "--out", str(tmp_path / "e")]) == 0
    manifest = json.loads((tmp_path / "e" / "hf_edit.json").read_text())
    assert {e["method"] for e in manifest["edits"]} == {"mend"} and len(manifest["edits"]) == 6
    assert main(["train-editor", "--method", "mend", "--model", str(base_dir), "--data", str(counterfact_path),
                 "--locality", str(locality), "--out", str(tmp_path / "x"), "--set", "bogus=1"]) == 2


# -- several processes ---------------------------------------------------------------------------------------------
_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from transformers import AutoModelForCausalLM, AutoTokenizer
from hf_edit.editors import EditorTrainingConfig, train_editor
from hf_edit.evaluation import load_eval_data
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained({base!r})
config = EditorTrainingConfig(**json.loads({config!r}))
result = train_editor("mend", model, tokenizer, load_eval_data({data!r}, n=40), output_dir=sys.argv[1],
                      config=config, locality_data={locality!r}, progress=False)
import torch.distributed as dist
if not dist.is_initialized() or dist.get_rank() == 0:
    print(json.dumps({{"steps": result.steps, "world": result.editor.training_info["world_size"]}}))
"""


@pytest.mark.slow
def test_two_processes_give_the_weights_of_one(base_dir, counterfact_path, locality, tmp_path):
    """CPU training with 2 processes (gloo, launched like ``torchrun``) equals 1 process with the same effective
    batch (4 edits per step: 2 × 2 accumulated vs 4 accumulated): every weight within 1e-6 + 1e-5·|w| (the
    normalisation sums of squares, ~300, within 1e-5 relative).  Gradients are all-reduced in another summation
    order and the statistics are merged per process, so the results agree up to float32 rounding, not bitwise."""
    config = quick(max_steps=3, n_loc=1).to_dict()
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT.format(tests=str(TESTS), base=str(base_dir), config=json.dumps(config),
                                     data=str(counterfact_path), locality=str(locality)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads(one.stdout.strip().splitlines()[-1]) == {"steps": 3, "world": 1}
    assert json.loads(two.stdout.strip().splitlines()[-1]) == {"steps": 3, "world": 2}
    a = weights(EditorNetwork.from_pretrained(tmp_path / "one"))
    b = weights(EditorNetwork.from_pretrained(tmp_path / "two"))
    assert_same_weights(a, b, atol=1e-6, rtol=1e-5)
    changed = max(float((a[k] - weights(EditorNetwork.create("mend", load(base_dir), config={"rank": 16}))[k]).abs()
                        .max()) for k in a if not k.endswith(("count", "_mean", "_m2")))
    assert changed > 1e-4  # the networks did train
