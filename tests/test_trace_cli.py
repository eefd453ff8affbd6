"""The ``hf-edit trace`` command, run in-process through ``hf_edit.cli.main`` on a tiny model saved to disk."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model

from hf_edit.cli import main
from hf_edit.tracing import choose_layers, noise_level, scaled_window, trace

PROMPT = "{} is located in the city of"
SUBJECT = "The Eiffel Tower"
FACTS = [{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
         {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": "chess"},
         {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}]


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gpt2_tokenizer):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("gpt2", vocab_size=len(gpt2_tokenizer), seed=3, initializer_range=0.2).save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def facts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("facts") / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    return path


def test_one_fact_prints_the_grid_and_writes_heatmap_and_json(model_dir, gpt2_tokenizer, tmp_path, capsys):
    out, png = tmp_path / "trace.json", tmp_path / "trace.png"
    args = ["trace", "--model", str(model_dir), "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "2",
            "--out", str(out), "--no-progress"]
    if _has_matplotlib():
        args += ["--plot", str(png)]
    assert main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    data = json.loads(out.read_text())
    n_tokens, n_layers = len(data["tokens"]), len(data["scores"][0])
    assert data["kind"] == "hidden" and data["window"] == 1 and data["samples"] == 2
    # Title line, a header of layer numbers, then one row per token with one value per layer.
    assert printed[1].split() == [str(i) for i in range(n_layers)]
    rows = printed[2: 2 + n_tokens]
    first, end = data["subject_range"]
    assert len(rows) == n_tokens and [row.split()[0].endswith("*") for row in rows] == [
        first <= i < end for i in range(n_tokens)]
    assert [float(v) for v in rows[-1].split()[-n_layers:]] == pytest.approx(data["scores"][-1], abs=6e-4)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = trace(model, gpt2_tokenizer, PROMPT, SUBJECT, kind="hidden", samples=2)
    torch.testing.assert_close(torch.tensor(data["scores"]), expected.scores, rtol=0, atol=1e-6)
    if _has_matplotlib():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_fact_mlp_uses_the_depth_scaled_window(model_dir, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["trace", "--model", str(model_dir), "--prompt", PROMPT, "--subject", SUBJECT, "--kind", "mlp",
                 "--target", "Paris", "--samples", "1", "--out", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "mlp" and data["window"] == scaled_window(3) and data["answer"].strip() == "Paris"
    assert "window 1" in capsys.readouterr().out


def test_many_facts_print_the_profile_and_the_layer_choice(model_dir, facts_file, gpt2_tokenizer, tmp_path,
                                                           capsys):
    out, png = tmp_path / "profile.json", tmp_path / "profile.png"
    args = ["trace", "--model", str(model_dir), "--data", str(facts_file), "--n", "2", "--samples", "2",
            "--layers", "2", "--out", str(out), "--no-progress"]
    if _has_matplotlib():
        args += ["--plot", str(png)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["kind"] == "mlp" and data["n"] == 2 and data["n_layers"] == 3 and data["token"] == "subject_last"
    assert data["choose_layers"] == list(choose_layers(data["mean"], 2))
    assert f"choose_layers: {data['choose_layers']}" in printed
    for layer, (mean, err) in enumerate(zip(data["mean"], data["stderr"])):
        assert f"{layer:>5}  {mean:.4f} ± {err:.4f}" in printed
    if _has_matplotlib():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from transformers import AutoModelForCausalLM

    from hf_edit.tracing import trace_dataset

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = trace_dataset(model, gpt2_tokenizer, FACTS[:2], kind="mlp", samples=2, window=scaled_window(3),
                             noise=noise_level(model, gpt2_tokenizer, [f["subject"] for f in FACTS[:2]]),
                             progress=False)
    torch.testing.assert_close(torch.tensor(data["mean"]), expected.mean, rtol=0, atol=1e-6)

    # The second run reads the cached profile.
    assert main(args[:-2] if _has_matplotlib() else args) == 0
    assert "(cached)" in capsys.readouterr().out


def _one_error_line(err: str, fragment: str) -> None:
    """Exactly one error line (after any progress bars), the last one, with no traceback."""
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("hf-edit: error: ") and fragment in errors[0], err
    assert err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err


@pytest.mark.parametrize("args, fragment", [
    (["--prompt", PROMPT], "--prompt and --subject"),
    ([], "--prompt and --subject"),
    (["--prompt", PROMPT, "--subject", SUBJECT, "--data", "{facts}"], "not both"),
    (["--data", "{facts}", "--target", "Rome"], "--target applies to one fact"),
    (["--prompt", "{} is big", "--subject", "x", "--samples", "0"], "--samples must be positive"),
    (["--prompt", "Paris is big", "--subject", "Rome"], "does not occur in the prompt"),
    (["--prompt", "{} and {}", "--subject", "Rome"], "one '{}'"),
    (["--data", "{tmp}/missing.json"], "missing.json"),
    (["--data", "{facts}", "--layers", "9"], "more than the model's 3 layers"),
    (["--data", "{counterfact}", "--n", "1", "--samples", "1"], "no fact was kept"),
])
def test_bad_input_is_one_clear_line(args, fragment, model_dir, facts_file, counterfact_path, tmp_path, capsys):
    args = [a.replace("{facts}", str(facts_file)).replace("{tmp}", str(tmp_path))
            .replace("{counterfact}", str(counterfact_path)) for a in args]
    assert main(["trace", "--model", str(model_dir), *args, "--no-progress", "--out", str(tmp_path / "o.json")]) == 2
    _one_error_line(capsys.readouterr().err, fragment)
    assert not (tmp_path / "o.json").exists()


def test_trace_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trace", "--help"])
    assert exit_info.value.code == 0 and "--plot" in capsys.readouterr().out
