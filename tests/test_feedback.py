"""Telling the user what happened: did each edit take, progress, partial failure, passthrough, errors that point at
the fix (through the Python API and the CLI)."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from hf_edit import EditedModel, EditRequest, ROMEConfig
from hf_edit.errors import DisablingEditError, EditDidNotTakeWarning, InvalidRequestError, ModelNotFoundError

EIFFEL = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome",
                     target_true="Paris")
MESSI = EditRequest(prompt="{} plays the sport of", subject="Lionel Messi", target_new="tennis")
JORDAN = EditRequest(prompt="{} is a professional", subject="Michael Jordan", target_new="baseball")


def config(wikitext_path, **overrides) -> ROMEConfig:
    values = dict(layers=1, mom2_dataset=str(wikitext_path), mom2_n_samples=200, mom2_max_length=64,
                  context_templates=("{}", "Hello. {}"), v_num_grad_steps=4)
    return ROMEConfig(**{**values, **overrides})


@pytest.fixture
def edited(gpt2_tokenizer, wikitext_path):
    return EditedModel(tiny_model("gpt2", vocab_size=len(gpt2_tokenizer)), gpt2_tokenizer,
                       method=config(wikitext_path), progress=False)


def test_every_edit_reports_whether_it_took(edited, gpt2_tokenizer, wikitext_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        edits = edited.edit([EIFFEL, MESSI])
    for edit in edits:
        (check,) = edit.info["checks"]
        assert set(check) >= {"p_new", "rank_new", "p_old", "rank_old", "top", "took"}
        assert 0 <= check["p_new"] <= 1 and check["took"] == (check["rank_new"] == 0)
    # an independent look at the first edit's prompt, on the model as edited after both edits... and the warning
    not_taken = [e for e in edits if not e.info["checks"][0]["took"]]
    assert len([w for w in caught if issubclass(w.category, EditDidNotTakeWarning)]) == len(not_taken)
    assert edits[0].info["checks"][0]["p_old"] is not None and edits[1].info["checks"][0]["p_old"] is None
    text = repr(edits[0])
    assert len(text) < 160 and "The Eiffel Tower" in text and "Rome" in text and "P(new)=" in text


def test_a_strong_edit_takes_and_verify_edits_tracks_it(gpt2_tokenizer, wikitext_path):
    # the subject ends the prompt, so the edited token is the one that predicts the target (as in test_rome)
    request = EditRequest(prompt="In Paris stands {}", subject="The Eiffel Tower", target_new="Rome",
                          target_true="Paris")
    edited = EditedModel(tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), initializer_range=0.1), gpt2_tokenizer,
                         progress=False, method=config(wikitext_path, mom2_n_samples=300, context_templates=None,
                                                       context_template_length_params=[[5, 3], [10, 3]],
                                                       v_num_grad_steps=20, kl_factor=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", EditDidNotTakeWarning)  # it takes: no warning
        (edit,) = edited.edit(request)
    check = edit.info["checks"][0]
    ids = gpt2_tokenizer(request.filled_prompt, return_tensors="pt")
    with torch.no_grad():
        probs = edited(**ids).logits[0, -1].softmax(-1)
    rome = gpt2_tokenizer(" Rome")["input_ids"][0]
    assert check["took"] and check["rank_new"] == 0 and probs.argmax().item() == rome
    assert check["p_new"] == pytest.approx(probs[rome].item(), rel=1e-4)
    table = edited.verify_edits()
    assert len(table) == 1 and table[0].holds and table[0].p_new_at_edit == pytest.approx(check["p_new"])
    assert "1 of 1 edited requests hold" in str(table)
    with edited.disable_edits():
        assert not edited.verify_edits()[0].holds  # the base model does not say Rome


def test_skip_keeps_the_work_that_succeeded(edited, monkeypatch):
    from hf_edit.methods.rome import ROMEEditor

    original = ROMEEditor.compute_update

    def refuse_messi(self, request, target):
        if request.subject == "Lionel Messi":
            raise DisablingEditError("The ROME update would break the model.", {"relative_norm": 99.0})
        return original(self, request, target)

    monkeypatch.setattr(ROMEEditor, "compute_update", refuse_messi)
    with pytest.raises(DisablingEditError, match=r"Request 1 \('Lionel Messi' -> 'tennis'\)") as error:
        edited.edit([EIFFEL, MESSI, JORDAN])
    assert error.value.request_index == 1 and edited.edits == ()  # atomic by default
    result = edited.edit([EIFFEL, MESSI, JORDAN], on_error="skip")
    assert [e.request.subject for e in result] == ["The Eiffel Tower", "Michael Jordan"]
    assert [(s.index, s.request.subject) for s in result.skipped] == [(1, "Lionel Messi")]
    assert isinstance(result.skipped[0].error, DisablingEditError)
    assert len(edited.edits) == 2


def test_progress_bar_only_when_asked(gpt2_tokenizer, wikitext_path, capfd):
    quiet = EditedModel(tiny_model("gpt2", vocab_size=len(gpt2_tokenizer)), gpt2_tokenizer,
                        method=config(wikitext_path), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet.edit([EIFFEL, MESSI])
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    loud = EditedModel(tiny_model("gpt2", vocab_size=len(gpt2_tokenizer)), gpt2_tokenizer,
                       method=config(wikitext_path), progress=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loud.edit([EIFFEL, MESSI])
    assert "rome edits" in capfd.readouterr().err


def test_edited_model_behaves_like_the_model(edited, gpt2_tokenizer, counterfact_path):
    from hf_edit.evaluation import counterfact_nll

    record = json.loads(counterfact_path.read_text())[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edited.edit(EIFFEL)
    through_wrapper = counterfact_nll(edited, gpt2_tokenizer, record)
    direct = counterfact_nll(edited.model, gpt2_tokenizer, record)
    assert through_wrapper == direct
    assert edited.get_output_embeddings() is edited.model.get_output_embeddings()
    assert edited.eval() is edited and edited.to("cpu") is edited and edited.dtype == torch.float32
    assert sum(1 for _ in edited.parameters()) > 0


def test_missing_local_path_is_reported_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("./tiny-missing", "../nowhere/model", str(tmp_path / "absent")):
        started = time.perf_counter()
        with pytest.raises(ModelNotFoundError, match="No such model folder"):
            EditedModel.from_pretrained(name)
        assert time.perf_counter() - started < 5  # no Hub round trip or retries


def test_relative_base_path_is_stored_resolved(gpt2_tokenizer, wikitext_path, tmp_path, monkeypatch):
    base = tmp_path / "work" / "tiny"
    tiny_model("gpt2", vocab_size=len(gpt2_tokenizer)).save_pretrained(base)
    gpt2_tokenizer.save_pretrained(base)
    monkeypatch.chdir(tmp_path / "work")
    model = EditedModel.from_pretrained("./tiny", method=config(wikitext_path), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.edit(EIFFEL)
    model.save_pretrained(tmp_path / "edit")
    manifest = json.loads((tmp_path / "edit" / "hf_edit.json").read_text())
    assert manifest["base_model"] == str(base.resolve())
    monkeypatch.chdir(tmp_path)  # another directory
    again = EditedModel.from_pretrained(tmp_path / "edit", progress=False)
    assert len(again.edits) == 1


def test_stats_data_names_the_statistics_once(gpt2_tokenizer, wikitext_path):
    from hf_edit.stats import load_or_compute_stats

    model = tiny_model("gpt2", vocab_size=len(gpt2_tokenizer))
    edited = EditedModel(model, gpt2_tokenizer, stats_data=wikitext_path, progress=False,
                         method=ROMEConfig(layers=1, mom2_n_samples=200, mom2_max_length=64,
                                           context_templates=("{}",), v_num_grad_steps=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (edit,) = edited.edit(EIFFEL)
    assert edit.config["mom2_dataset"] == str(wikitext_path)
    from hf_edit.architecture import resolve_target

    expected = load_or_compute_stats(model, gpt2_tokenizer, resolve_target(model, 1), dataset=str(wikitext_path),
                                     n_samples=200, max_length=64, progress=False)
    assert edit.info["stats_fingerprint"] == expected.fingerprint()
    explicit = ROMEConfig(layers=1, mom2_dataset="my/other-data")
    assert edited._editor(explicit, stats_data="x").config.mom2_dataset == "my/other-data"  # explicit wins


# ----------------------------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def base_dir(tmp_path, gpt2_tokenizer):
    folder = tmp_path / "base"
    tiny_model("gpt2", vocab_size=len(gpt2_tokenizer)).save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return folder


def run(*argv: str) -> int:
    from hf_edit.cli import main

    return main(list(argv))


def test_cli_reports_each_edit_and_skips_on_request(base_dir, tmp_path, wikitext_path, capsys):
    requests = tmp_path / "r.jsonl"
    requests.write_text("\n".join(json.dumps(r.to_dict()) for r in (EIFFEL, MESSI)))
    common = ["edit", "--model", str(base_dir), "--requests", str(requests), "--method", "rome", "--layer", "1",
              "--stats-data",
              str(wikitext_path), "--set", "mom2_n_samples=200", "--set", "mom2_max_length=64", "--set",
              'context_templates=["{}"]', "--set", "v_num_grad_steps=2", "--no-progress"]
    assert run(*common, "--out", str(tmp_path / "out")) == 0
    lines = capsys.readouterr().out.splitlines()
    edit_lines = [line for line in lines if line.startswith("rome ")]
    assert len(edit_lines) == 2 and all("P(new)=" in line and ("took" in line or "DID NOT TAKE" in line)
                                        for line in edit_lines)
    assert run(*common, "--set", "guard_max_relative_norm=0.0", "--on-error", "skip", "--out",
               str(tmp_path / "o2")) == 2
    captured = capsys.readouterr()
    assert captured.out.count("skipped: Request") == 2 and "no edit was applied" in captured.err


def test_cli_errors_point_at_the_fix(base_dir, tmp_path, capsys):
    inline = ["--prompt", "The Eiffel Tower is in", "--subject", "The Eiffel Tower", "--target", "Rome"]
    assert run("edit", "--model", str(base_dir), *inline, "--out", str(tmp_path / "o")) == 2
    assert "exactly one '{}'" in capsys.readouterr().err  # the same rule as EditRequest
    good = ["--prompt", "{} is in", "--subject", "The Eiffel Tower", "--target", "Rome"]
    assert run("edit", "--model", str(base_dir), *good, "--stats", str(tmp_path / "missing.safetensors"),
               "--out", str(tmp_path / "o")) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("edit", "--model", str(base_dir), *good, "--layer", "-1", "--out", str(tmp_path / "o"))
    assert "layers are numbered from 0" in capsys.readouterr().err
    assert run("edit", "--model", str(tmp_path / "no-model"), *good, "--out", str(tmp_path / "o")) == 2
    assert "No such model folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(InvalidRequestError):
        EditRequest(prompt="The Eiffel Tower is in", subject="The Eiffel Tower", target_new="Rome")


def test_cli_stats_compute_says_computed_or_reused(base_dir, wikitext_path, capsys):
    args = ["stats", "compute", "--model", str(base_dir), "--layer", "1", "--data", str(wikitext_path),
            "--n-samples", "100", "--max-length", "64", "--no-progress"]
    assert run(*args) == 0
    first = capsys.readouterr().out
    assert "computed and cached in" in first
    assert run(*args) == 0
    assert "reused the cache file" in capsys.readouterr().out
    path = first.rsplit("computed and cached in ", 1)[1].strip()
    assert Path(path).is_file() and os.environ["HF_EDIT_CACHE"] in path
