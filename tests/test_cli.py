"""The hf-edit command line, run as a user runs it: in a subprocess, offline, on a tiny local model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_hub import fake_hub  # noqa: F401
from tiny_models import tiny_model

from hf_edit import EditedModel

# ROME, explicitly: a tiny random model has no preset, so method=None would mean the layer-wise method.
SMALL = ["--method", "rome", "--layer", "1", "--set", "v_num_grad_steps=5", "--set",
         'context_templates=["{}", "Hello world. {}"]', "--set", "mom2_max_length=64"]
EIFFEL = ["--prompt", "{} is located in the city of", "--subject", "The Eiffel Tower", "--target", "Rome",
          "--target-true", "Paris"]


def hf_edit(*args: str, cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m hf_edit ARGS`` offline with its own statistics cache."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EDIT_CACHE=str(cache))
    result = subprocess.run([sys.executable, "-m", "hf_edit", *args], capture_output=True, text=True, env=env,
                            timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"hf-edit {' '.join(args)} failed:\n{result.stderr}")
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    """Exit status 2 and exactly one error line (after any progress bars), with no traceback."""
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("hf-edit: error: ") and fragment in errors[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def base(tmp_path_factory, gpt2_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("base")
    tiny_model("gpt2", vocab_size=len(gpt2_tokenizer)).save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def edited(tmp_path_factory, base, wikitext_path) -> Path:
    """An edit folder written by ``hf-edit edit`` with one request from arguments and one from a file."""
    work = tmp_path_factory.mktemp("cli")
    requests = work / "requests.jsonl"
    requests.write_text(json.dumps({"prompt": "{} plays the sport of", "subject": "Michael Jordan",
                                    "target_new": {"str": "chess"}}) + "\n")
    out = work / "edit"
    hf_edit("edit", "--model", str(base), *EIFFEL, "--requests", str(requests), "--stats-data", str(wikitext_path),
            "--stats-samples", "300", *SMALL, "--out", str(out), cache=work / "cache")
    return out


@pytest.mark.parametrize("command", [[], ["edit"], ["eval"], ["show"], ["merge"], ["stats"], ["stats", "compute"],
                                     ["stats", "push"], ["stats", "pull"], ["stats", "import-npz"]])
def test_every_command_has_useful_help(command, capsys):
    from hf_edit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith("usage: hf-edit") and len(out.splitlines()) > 5


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).parent / "hf-edit"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "edit" in result.stdout


def test_edit_writes_an_adapter_that_loads(edited, base, gpt2_tokenizer):
    manifest = json.loads((edited / "hf_edit.json").read_text())
    subjects = [e["requests"][0]["subject"] for e in manifest["edits"]]
    assert subjects == ["Michael Jordan", "The Eiffel Tower"]
    assert manifest["edits"][0]["config"]["v_num_grad_steps"] == 5 and manifest["edits"][0]["layer"] == 1
    model = EditedModel.from_pretrained(edited, progress=False)
    assert len(model.edits) == 2 and model.edits[1].request.target_true == "Paris"


def test_show_lists_the_edits_without_loading_a_model(edited, tmp_path):
    result = hf_edit("show", str(edited), cache=tmp_path)
    assert "The Eiffel Tower" in result.stdout and "Paris -> Rome" in result.stdout
    assert "Michael Jordan" in result.stdout and "? -> chess" in result.stdout


def test_merge_writes_a_plain_model_equal_to_the_edited_one(edited, tmp_path, gpt2_tokenizer):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    hf_edit("merge", str(edited), "--out", str(out), cache=tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    inputs = gpt2_tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        expected = EditedModel.from_pretrained(edited, progress=False)(**inputs).logits
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=0, atol=2e-5)
    assert (out / "tokenizer.json").exists()


def test_stats_compute_then_edit_with_the_file(base, wikitext_path, tmp_path):
    stats_file = tmp_path / "c1.safetensors"
    result = hf_edit("stats", "compute", "--model", str(base), "--layer", "1", "--data", str(wikitext_path),
                     "--n-samples", "300", "--max-length", "64", "--out", str(stats_file), cache=tmp_path / "c")
    assert "transformer.h.1.mlp.c_proj" in result.stdout and stats_file.exists()
    out = tmp_path / "edit"
    hf_edit("edit", "--model", str(base), *EIFFEL, "--stats", str(stats_file), *SMALL, "--out", str(out),
            cache=tmp_path / "empty-cache")
    manifest = json.loads((out / "hf_edit.json").read_text())
    from hf_edit.stats import SecondMomentStats

    assert manifest["edits"][0]["info"]["stats_fingerprint"] == SecondMomentStats.load(stats_file).fingerprint()
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").rglob("*.safetensors"))


def test_ft_plus_l_from_the_command_line(base, tmp_path):
    out = tmp_path / "ftl"
    hf_edit("edit", "--model", str(base), *EIFFEL, "--method", "ft+l", "--set", "num_steps=3", "--out", str(out),
            cache=tmp_path)
    manifest = json.loads((out / "hf_edit.json").read_text())
    assert manifest["edits"][0]["method"] == "ft+l" and manifest["edits"][0]["layer"] == 0


@pytest.mark.parametrize("args, fragment", [
    (["edit", "--model", "{base}", "--prompt", "no placeholder", "--subject", "x", "--target", "y",
      "--out", "{tmp}/o"], "found 0 in 'no placeholder'"),  # --prompt follows EditRequest's rule: one {}
    (["edit", "--model", "{base}", "--prompt", "{} and {}", "--subject", "x", "--target", "y",
      "--out", "{tmp}/o"], "exactly one '{}'"),
    (["edit", "--model", "{base}", "--prompt", "{} is", "--out", "{tmp}/o"], "go together"),
    (["edit", "--model", "{base}", *EIFFEL], "--out DIR"),
    (["edit", "--model", "{base}", *EIFFEL, "--layer", "9", "--out", "{tmp}/o"], "out of range"),
    (["edit", "--model", "{base}", *EIFFEL, "--set", "bogus=1", "--out", "{tmp}/o"], "bogus"),
    (["show", "{tmp}"], "not an hf_edit edit folder"),
    (["merge", "{tmp}", "--out", "{tmp}/m"], "not an hf_edit edit folder"),
    (["stats", "compute", "--model", "{base}", "--layer", "7"], "out of range"),
])
def test_bad_input_is_one_clear_line(args, fragment, base, tmp_path):
    args = [a.replace("{base}", str(base)).replace("{tmp}", str(tmp_path)) for a in args]
    assert_one_line_error(hf_edit(*args, cache=tmp_path, check=False), fragment)
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()


def hf_edit_with_hub(hub, state: Path, *args: str, cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process served by the fake Hub; the Hub's new state is read back into ``hub``."""
    from fake_hub import FakeHub, subprocess_env

    env = subprocess_env(hub, state, state.parent / "hf_home")
    env.update(HF_EDIT_CACHE=str(cache), PYTHONPATH=str(Path(__file__).parent))
    script = ("import os, sys\nfrom fake_hub import install_from_env\nhub = install_from_env()\n"
              "from hf_edit.cli import main\nstatus = main(sys.argv[1:])\n"
              "hub.dump(os.environ['FAKE_HUB_STATE'])\nsys.exit(status)")
    result = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 or not check, result.stderr[-2000:]
    hub.__dict__.update(FakeHub.load(state).__dict__)
    return result


@pytest.mark.slow
def test_edit_push_show_and_stats_push_pull_through_the_hub(fake_hub, base, wikitext_path, tmp_path):  # noqa: F811
    hf_edit_with_hub(fake_hub, tmp_path / "hub.json", "edit", "--model", str(base), *EIFFEL, "--stats-data",
                     str(wikitext_path), "--stats-samples", "300", *SMALL, "--push-to-hub", "user/cli-edit",
                     cache=tmp_path / "cache")
    assert {"hf_edit.json", "README.md", "adapter_model.safetensors"} <= set(fake_hub.files("user/cli-edit"))
    shown = hf_edit_with_hub(fake_hub, tmp_path / "hub.json", "show", "user/cli-edit", cache=tmp_path / "cache")
    assert "Paris -> Rome" in shown.stdout

    stats_file = tmp_path / "c1.safetensors"
    hf_edit("stats", "compute", "--model", str(base), "--layer", "1", "--data", str(wikitext_path), "--n-samples",
            "300", "--max-length", "64", "--out", str(stats_file), cache=tmp_path / "cache")
    location = ["--repo", "user/stats", "--model-id", "user/tiny", "--model-revision", "abc", "--dataset", "wiki"]
    hf_edit_with_hub(fake_hub, tmp_path / "hub.json", "stats", "push", str(stats_file), *location,
                     cache=tmp_path / "cache")
    pulled = tmp_path / "pulled.safetensors"
    hf_edit_with_hub(fake_hub, tmp_path / "hub.json", "stats", "pull", *location, "--module",
                     "transformer.h.1.mlp.c_proj", "--n-samples", "300", "--out", str(pulled), cache=tmp_path / "cache")
    from hf_edit.stats import SecondMomentStats

    original, round_trip = SecondMomentStats.load(stats_file), SecondMomentStats.load(pulled)
    assert torch.equal(original.mom2_sum, round_trip.mom2_sum) and original.count == round_trip.count


def test_stats_commands_reject_bad_input_in_one_line(fake_hub, tmp_path):  # noqa: F811
    location = ["--repo", "user/stats", "--model-id", "user/tiny", "--dataset", "wiki"]
    missing = hf_edit_with_hub(fake_hub, tmp_path / "hub.json", "stats", "pull", *location, "--module",
                               "transformer.h.1.mlp.c_proj", "--n-samples", "300", "--out", str(tmp_path / "s"),
                               cache=tmp_path, check=False)
    assert_one_line_error(missing, "No statistics")
    not_a_file = hf_edit_with_hub(fake_hub, tmp_path / "hub.json", "stats", "push", str(tmp_path / "nope"),
                                  *location, cache=tmp_path, check=False)
    assert_one_line_error(not_a_file, "nope")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz file")
    bad_npz = hf_edit_with_hub(fake_hub, tmp_path / "hub.json", "stats", "import-npz", str(garbage), *location,
                               "--module", "transformer.h.1.mlp.c_proj", "--n-samples", "300", cache=tmp_path,
                               check=False)
    assert_one_line_error(bad_npz, "garbage.npz")
    assert ("dataset", "user/stats") not in fake_hub.repos  # nothing was uploaded


def test_eval_command_writes_results(base, tmp_path, counterfact_path, wikitext_path, capsys):
    from hf_edit.cli import main

    model_dir = base
    out = tmp_path / "results.json"
    status = main(["eval", "--model", str(model_dir), "--method", "ft", "--layer", "1", "--set", "num_steps=2",
                   "--data", str(counterfact_path), "--n", "2", "--protocol", "sequential", "--out", str(out),
                   "--edit-batch-size", "2", "--capability", str(wikitext_path), "--capability-windows", "3",
                   "--no-progress"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "protocol=sequential" in printed and "ES" in printed and "capability: perplexity" in printed
    result = json.loads(out.read_text())
    assert result["method"] == "ft" and result["protocol"] == "sequential" and result["data"]["n"] == 2
    assert result["settings"]["edit_batch_size"] == 2 and [c["edit"]["call"] for c in result["cases"]] == [0, 0]
    assert result["capability"]["pre"]["windows"] == 3 and result["capability"]["post"]["perplexity_ratio"] > 0
    assert [c["edit"]["ok"] for c in result["cases"]] == [True, True]


def test_eval_command_bad_input(tmp_path, counterfact_path, capsys):
    from hf_edit.cli import main

    assert main(["eval", "--model", "x", "--data", str(tmp_path / "missing.json"), "--method", "none"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--model", "x", "--data", str(counterfact_path), "--method", "none", "--layer", "1"]) == 2
    assert "--method none" in capsys.readouterr().err
    assert main(["eval", "--model", "x", "--data", str(counterfact_path), "--method", "ft",
                 "--edit-batch-size", "4"]) == 2
    assert "--protocol sequential" in capsys.readouterr().err
    assert main(["eval", "--model", "x", "--data", str(counterfact_path), "--method", "ft",
                 "--capability", "wiki.txt"]) == 2
    assert "--protocol batch or sequential" in capsys.readouterr().err
