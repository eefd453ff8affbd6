"""The plugin contract, checked for every registered method (a new method gets these tests for free).

For each method: bad input fails before any computation and changes nothing; the saved factors reproduce the
weight change; save → load is exact with hf_edit and with plain peft in a fresh process; disabling the edits gives
the base model bitwise; removing them too; the CLI edits, shows and evaluates with it.  Then a method defined in
this file and one defined in ``examples/custom_method.py`` (installed through an entry point in a fresh process)
go through the same paths with no change to hf_edit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from helpers import logits_without_hf_edit
from tiny_models import tiny_model

from hf_edit import EditedModel, EditRequest
from hf_edit.architecture import base_layer, unwrap_model
from hf_edit.errors import ConfigError, InvalidRequestError, LayerOutOfRangeError, UnknownMethodError
from hf_edit.methods import (
    EditConfig,
    EditContext,
    Editor,
    Update,
    available_methods,
    config_from_dict,
    get_method,
    register_method,
    resolve_config,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
REQUEST = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome",
                      target_true="Paris")
OTHER = EditRequest(prompt="{} plays the sport of", subject="Lionel Messi", target_new="tennis")
PROBE = "The Eiffel Tower is located in the city of"
BUILTIN = ["ft", "ft+l", "rome", "memit", "emmet", "layerwise", "alphaedit", "kn", "mend", "ke"]
#: Editor networks (untrained, layer 1) for the trainable methods, made by the base_dir fixture.
_EDITORS: dict[str, str] = {}


def fast_config(name: str, wikitext: Path, **overrides) -> EditConfig:
    """The method's defaults made fast for tiny models: only fields the config has are set."""
    config_class = get_method(name).config_class
    names = {f.name for f in dataclasses.fields(config_class)}
    settings = dict(layers=(1,), mom2_dataset=str(wikitext), mom2_n_samples=200, mom2_max_length=64,
                    context_templates=("{}", "Hello. {}"), v_num_grad_steps=4, num_steps=3, lr=1e-2,
                    editor=_EDITORS.get(name))
    return config_class(**{k: v for k, v in {**settings, **overrides}.items() if k in names})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, gpt2_tokenizer):
    folder = tmp_path_factory.mktemp("contract_base")
    tiny_model("gpt2", vocab_size=len(gpt2_tokenizer)).save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    from hf_edit.editors import EditorNetwork  # MEND and KE edit with a network made for this base model

    editors = tmp_path_factory.mktemp("contract_editors")
    for kind, network in (("mend", {"rank": 32}), ("ke", {"hidden_dim": 16, "condition_dim": 16, "lstm_hidden": 16})):
        EditorNetwork.create(kind, load_base(folder), layers=(1,), config=network).save_pretrained(editors / kind)
        _EDITORS[kind] = str(editors / kind)
    return folder


def load_base(base_dir) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(PROBE, return_tensors="pt")).logits.clone()


def cache_files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def merged_delta(edited: EditedModel, module: str) -> torch.Tensor:
    """ΔW (Linear orientation) that the adapters add to ``module``: merged weight minus base weight."""
    from hf_edit.architecture import resolve_target

    weight = base_layer(unwrap_model(edited.base_model).get_submodule(module)).weight.detach().clone()
    is_conv1d = resolve_target(edited.base_model, None, module).is_conv1d
    merged = edited.merge_and_unload().get_submodule(module).weight.detach()
    delta = merged - weight
    return delta.T if is_conv1d else delta


# ----------------------------------------------------------------------------------------------------------------
# Every registered method
# ----------------------------------------------------------------------------------------------------------------
def test_builtin_methods_are_registered():
    assert set(BUILTIN) <= set(available_methods())
    for name in BUILTIN:
        entry = get_method(name)
        assert entry.config_class.method == name and entry.label and entry.description
        assert resolve_config(name).name == name


@pytest.mark.parametrize("method", BUILTIN)
def test_bad_input_fails_before_computing_and_changes_nothing(method, base_dir, gpt2_tokenizer, wikitext_path,
                                                              isolated_cache):
    edited = EditedModel.from_pretrained(base_dir, progress=False)
    edited.edit(REQUEST, method=fast_config(method, wikitext_path))
    before = (logits(edited, gpt2_tokenizer), edited.edits, cache_files(isolated_cache),
              {n: f.A.clone() for n, f in ((e.module, e.factors) for e in edited.edits)})
    calls = []
    editor_class = get_method(method).editor_class
    original = editor_class.compute
    editor_class.compute = lambda self, requests: calls.append(requests) or original(self, requests)
    try:
        with pytest.raises(LayerOutOfRangeError):
            edited.edit([OTHER], method=fast_config(method, wikitext_path, layers=(99,)))
        with pytest.raises(UnknownMethodError):
            edited.edit([OTHER], method="no-such-method")
        with pytest.raises(InvalidRequestError, match="exactly one"):  # a bad request after a good one
            edited.edit([OTHER, {"prompt": "{} and {}", "subject": "x", "target_new": "y"}],
                        method=fast_config(method, wikitext_path))
    finally:
        editor_class.compute = original
    assert calls == []  # nothing was computed: validation comes first
    after_logits = logits(edited, gpt2_tokenizer)
    assert torch.equal(after_logits, before[0])
    assert edited.edits == before[1] and all(a is b for a, b in zip(edited.edits, before[1]))
    assert cache_files(isolated_cache) == before[2]
    assert all(torch.equal(e.factors.A, before[3][e.module]) for e in edited.edits)


@pytest.mark.parametrize("method", BUILTIN)
def test_factors_disable_remove_and_round_trips(method, base_dir, gpt2_tokenizer, wikitext_path, tmp_path):
    edited = EditedModel.from_pretrained(base_dir, progress=False)
    base_logits = logits(edited, gpt2_tokenizer)
    edits = edited.edit([REQUEST, OTHER], method=fast_config(method, wikitext_path))
    assert edits and all(e.method == method for e in edits)
    assert json.loads(json.dumps(edits[0].config))["method"] == method
    edited_logits = logits(edited, gpt2_tokenizer)
    assert not torch.equal(edited_logits, base_logits)
    with edited.disable_edits():
        assert torch.equal(logits(edited, gpt2_tokenizer), base_logits)

    # save -> load with hf_edit (same process) and with plain peft / transformers (fresh process, no hf_edit)
    edited.save_pretrained(tmp_path / "edit")
    manifest = json.loads((tmp_path / "edit" / "hf_edit.json").read_text())
    assert {e["method"] for e in manifest["edits"]} == {method}
    reloaded = EditedModel.from_pretrained(tmp_path / "edit", progress=False)
    assert torch.equal(logits(reloaded, gpt2_tokenizer), edited_logits)
    assert [e.method for e in reloaded.edits] == [e.method for e in edited.edits]
    assert all(torch.equal(a.factors.A, b.factors.A) and torch.equal(a.factors.B, b.factors.B)
               for a, b in zip(reloaded.edits, edited.edits))
    if len(reloaded.peft_model.peft_config) == 1:  # plain peft loads the first adapter
        ids = gpt2_tokenizer(PROBE, return_tensors="pt")["input_ids"]
        peft_logits, native_logits = logits_without_hf_edit(base_dir, tmp_path / "edit", ids, tmp_path)
        torch.testing.assert_close(peft_logits, edited_logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(native_logits, edited_logits, rtol=0, atol=1e-6)

    # the factors reproduce the weight change of every module
    deltas: dict[str, torch.Tensor] = {}
    for e in reloaded.edits:
        deltas[e.module] = deltas.get(e.module, 0) + e.factors.B @ e.factors.A
    for module, delta in deltas.items():
        again = EditedModel.from_pretrained(tmp_path / "edit", progress=False)
        torch.testing.assert_close(merged_delta(again, module), delta, rtol=1e-5, atol=1e-6)

    # removing every edit restores the base model bitwise
    while reloaded.edits:
        removed = reloaded.remove_edit(0)
        assert removed and all(r.batch == removed[0].batch for r in removed)
    assert torch.equal(logits(reloaded, gpt2_tokenizer), base_logits)


@pytest.mark.slow
@pytest.mark.parametrize("method", BUILTIN)
def test_cli_edits_shows_and_evaluates(method, base_dir, tmp_path, wikitext_path, counterfact_path, capsys):
    from hf_edit.cli import main

    config = fast_config(method, wikitext_path).to_dict()
    sets = [a for k, v in config.items() if k not in ("method", "layers", "mom2_dataset") and v is not None
            and k in ("mom2_n_samples", "mom2_max_length", "v_num_grad_steps", "num_steps", "lr", "context_templates",
                     "editor")
            for a in ("--set", f"{k}={json.dumps(v)}")]
    stats = ["--stats-data", str(wikitext_path)] if "mom2_dataset" in config else []
    out = tmp_path / "edit"
    assert main(["edit", "--model", str(base_dir), "--method", method, "--layer", "1", *sets, *stats,
                 "--prompt", REQUEST.prompt, "--subject", REQUEST.subject, "--target", REQUEST.target_new,
                 "--out", str(out)]) == 0
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert method in shown and "The Eiffel Tower" in shown
    assert main(["eval", "--model", str(base_dir), "--method", method, "--layer", "1", *sets, *stats,
                 "--data", str(counterfact_path), "--n", "2", "--no-progress", "--out",
                 str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["method"] == method and len(result["cases"]) == 2


def test_cli_set_is_type_checked(base_dir, tmp_path, capsys):
    from hf_edit.cli import main

    common = ["edit", "--model", str(base_dir), "--prompt", REQUEST.prompt, "--subject", REQUEST.subject,
              "--target", "Rome", "--out", str(tmp_path / "o")]
    assert main([*common, "--set", "v_lr=abc"]) == 2
    assert "v_lr=abc: expected a number" in capsys.readouterr().err
    assert main([*common, "--set", "bogus=1"]) == 2
    assert "unknown hyperparameter" in capsys.readouterr().err
    assert main([*common, "--method", "ft", "--stats-data", "x"]) == 2
    assert "--stats-data applies to methods that use second-moment statistics" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert all(m in listed for m in BUILTIN)
    assert main(["methods", "rome"]) == 0 and "v_lr" in capsys.readouterr().out


def test_one_preset_rule_for_every_method():
    for name in BUILTIN:
        config_class = get_method(name).config_class
        for key in config_class.presets:
            short = key.split("/")[-1]
            assert config_class.preset(key) == config_class.preset(f"someone/{short}") == \
                config_class.preset(short.upper())


def test_config_dicts_round_trip_through_the_registry():
    from hf_edit import FTConfig, FTLConfig, ROMEConfig

    for config in (ROMEConfig(layers=3, v_lr=0.1), FTConfig(layers=2), FTLConfig(norm_constraint=1e-3)):
        again = config_from_dict(config.to_dict())
        assert again.to_dict() == config.to_dict()
    assert type(config_from_dict(FTConfig(norm_constraint=1e-3).to_dict())) is FTLConfig
    with pytest.raises(ConfigError, match="Unknown ROME hyperparameters"):
        ROMEConfig.from_dict({"bogus": 1})
    with pytest.raises(UnknownMethodError, match="available"):
        config_from_dict({"method": "nope"})


# ----------------------------------------------------------------------------------------------------------------
# A method defined here, registered from outside hf_edit
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BiasFreeShiftConfig(EditConfig):
    """A joint test method: one rank-k update making W' k_i = W k_i + s e_i for every request's key k_i.

    Args:
        step: the length s of each shift.
    """

    method: ClassVar[str] = "test-joint-shift"
    label: ClassVar[str] = "Joint shift (test)"
    description: ClassVar[str] = "Least-squares rank-k shift of the keys of all requests (a test plugin)."
    step: float = 5.0


class BiasFreeShiftEditor(Editor):
    config_class = BiasFreeShiftConfig
    joint = True

    def compute(self, requests: Sequence[EditRequest]) -> list[Update]:
        from hf_edit.hooks import capture

        model = unwrap_model(self.model)
        (target,) = self.targets()
        module = model.get_submodule(target.name)
        keys = []
        for request in requests:
            ids = torch.tensor([self.tokenizer(request.filled_prompt)["input_ids"]])
            with torch.no_grad(), capture(module, tuple(ids.shape)) as seen:
                self.model(input_ids=ids)
            keys.append(seen.inputs[0, -1].float())
        K = torch.stack(keys)  # (n, in)
        A = torch.linalg.pinv(K)  # (in, n): K A = I, so (B Aᵀ... ) maps k_i to column i of B
        embedding = model.get_output_embeddings().weight.detach().float()
        ids = [self.tokenizer(" " + r.target_new)["input_ids"][0] for r in requests]
        B = self.config.step * torch.nn.functional.normalize(embedding[ids], dim=-1).T  # (out, n)
        return [Update(module=target.name, A=A.T.contiguous(), B=B, requests=tuple(requests), layer=target.layer,
                       info={"n": len(requests)})]


@pytest.fixture
def test_plugin():
    register_method(BiasFreeShiftConfig, BiasFreeShiftEditor, replace=True)
    return "test-joint-shift"


def test_plugin_defined_in_a_test_file(test_plugin, base_dir, gpt2_tokenizer, tmp_path, capsys):
    edited = EditedModel.from_pretrained(base_dir, progress=False)
    base_logits = logits(edited, gpt2_tokenizer)
    (edit,) = edited.edit([REQUEST, OTHER], method=BiasFreeShiftConfig(layers=1))
    assert edit.method == test_plugin and edit.factors.rank == 2 and len(edit.requests) == 2
    # the update maps each request's key exactly as defined: W'k_i - W k_i = step * e_i / |e_i|
    module = unwrap_model(edited.base_model).get_submodule(edit.module)
    ids = torch.tensor([gpt2_tokenizer(REQUEST.filled_prompt)["input_ids"]])
    seen = {}
    handle = module.register_forward_hook(lambda m, a, o: seen.update(x=a[0][0, -1].detach()))
    with torch.no_grad():
        edited(input_ids=ids)
    handle.remove()
    shift = edit.factors.B @ (edit.factors.A @ seen["x"])
    torch.testing.assert_close(shift, edit.factors.B[:, 0], rtol=1e-3, atol=1e-3)
    # a second call stacks into the same adapter (stackable by default)
    edited.edit([OTHER], method=BiasFreeShiftConfig(layers=1, step=1.0))
    assert len({e.adapter for e in edited.edits}) == 1
    edited.save_pretrained(tmp_path / "edit")
    from hf_edit.cli import main

    assert main(["show", str(tmp_path / "edit")]) == 0
    assert test_plugin in capsys.readouterr().out
    card = (tmp_path / "edit" / "README.md").read_text()
    assert "Joint shift (test)" in card and "Least-squares rank-k shift" in card
    reloaded = EditedModel.from_pretrained(tmp_path / "edit", progress=False)
    assert torch.equal(logits(reloaded, gpt2_tokenizer), logits(edited, gpt2_tokenizer))
    reloaded.remove_edit(0)  # the joint batch of two requests goes as a whole
    assert len(reloaded.edits) == 1 and reloaded.edits[0].config["step"] == 1.0
    reloaded.remove_edit(0)
    assert torch.equal(logits(reloaded, gpt2_tokenizer), base_logits)


def test_registration_checks_the_contract(test_plugin):
    with pytest.raises(ConfigError, match="already registered"):
        register_method(BiasFreeShiftConfig, BiasFreeShiftEditor, aliases=("rome",))
    with pytest.raises(ConfigError):
        register_method(BiasFreeShiftConfig, object)  # type: ignore[arg-type]
    editor = BiasFreeShiftEditor(BiasFreeShiftConfig(layers=1), EditContext(tiny_model("gpt2"), None))
    assert editor.config.layers == (1,)
    with pytest.raises(ConfigError, match="needs a BiasFreeShiftConfig"):
        BiasFreeShiftEditor(get_method("rome").config_class(), EditContext(tiny_model("gpt2"), None))


# ----------------------------------------------------------------------------------------------------------------
# The example plugin in a separate file, installed through an entry point
# ----------------------------------------------------------------------------------------------------------------
def _install_example_plugin(site: Path) -> None:
    """Make ``examples/custom_method.py`` an installed distribution with an ``hf_edit.methods`` entry point."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "custom_method.py").write_text((EXAMPLES / "custom_method.py").read_text())
    info = site / "hf_edit_output_shift-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hf-edit-output-shift\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[hf_edit.methods]\noutput-shift = custom_method\n")


@pytest.mark.slow
def test_example_plugin_in_a_fresh_process(base_dir, gpt2_tokenizer, tmp_path, counterfact_path):
    site = tmp_path / "site"
    _install_example_plugin(site)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    script = textwrap.dedent(f"""
        import json, torch
        torch.set_num_threads(1)  # logits compared bitwise in another process: the same summation order
        from hf_edit import EditedModel, EditRequest, available_methods
        from hf_edit.evaluation import evaluate_model
        assert "output-shift" in available_methods()
        request = EditRequest(prompt="{{}} is located in the city of", subject="The Eiffel Tower", target_new="Rome")
        model = EditedModel.from_pretrained({str(base_dir)!r}, progress=False)
        model.edit(request, method="output-shift")
        model.save_pretrained({str(tmp_path / 'edit')!r})
        ids = model.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
        with torch.no_grad():
            torch.save(model(**ids).logits, {str(tmp_path / 'edited.pt')!r})
        result = evaluate_model({str(base_dir)!r}, {str(counterfact_path)!r}, method="output-shift", n=2,
                                progress=False)
        print(json.dumps({{"method": result.method, "n": len(result.cases)}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"method": "output-shift", "n": 2}
    # a fresh process that never imports the plugin by hand: the entry point rebuilds the method
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        from hf_edit import EditedModel
        from hf_edit.cli import main
        model = EditedModel.from_pretrained({str(tmp_path / 'edit')!r}, progress=False)
        assert "custom_method" in sys.modules and model.edits[0].method == "output-shift"
        ids = model.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
        with torch.no_grad():
            assert torch.equal(model(**ids).logits, torch.load({str(tmp_path / 'edited.pt')!r}))
        model.edit(model.edits[0].request)  # the default method is the latest edit's: the plugin's
        assert [e.method for e in model.edits] == ["output-shift"] * 2
        sys.exit(main(["show", {str(tmp_path / 'edit')!r}]))
    """)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "output-shift" in done.stdout
    # plain peft, without hf_edit or the plugin
    ids = gpt2_tokenizer(PROBE, return_tensors="pt")["input_ids"]
    peft_logits, _ = logits_without_hf_edit(base_dir, tmp_path / "edit", ids, tmp_path)
    torch.testing.assert_close(peft_logits, torch.load(tmp_path / "edited.pt"), rtol=0, atol=1e-6)
