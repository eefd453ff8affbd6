"""Data-parallel evaluation: ``hf-edit eval`` under 2 CPU processes (gloo) writes the single-process result.

The 2-process runs launch ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m hf_edit eval ...``
(what ``accelerate launch --multi_gpu --num_processes 2`` runs underneath) on a tiny GPT-2 saved with the real GPT-2
tokenizer; the reference is ``python -m hf_edit eval ...`` with the same arguments, in one process.  Every process
runs with one thread, so both compute with the same float32 kernels.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tiny_models import tiny_model

from hf_edit.errors import ConfigError
from hf_edit.stats.distributed import ProcessGroup

LAUNCH_TIMEOUT_S = 300
_LAUNCHER_ENV_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_", "PET_")
_LAUNCHER_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"}
#: Keys that hold wall-clock times (they differ from run to run).
_TIMES = {"timing", "seconds", "time_s"}


def _eval(tmp_path: Path, processes: int, args: list[str], cache: Path) -> subprocess.CompletedProcess:
    """``hf-edit eval ARGS`` in one process, or in ``processes`` under torchrun; killed (with its process group)
    if it overruns the timeout."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_ENV and not k.startswith(_LAUNCHER_ENV_PREFIXES)}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"), HF_EDIT_CACHE=str(cache))
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                          str(processes), "--max_restarts", "0", "--monitor_interval", "0.5"]
    command = [sys.executable, *launcher, "-m", "hf_edit", "eval", *args]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"hf-edit eval with {processes} process(es) did not finish within {LAUNCH_TIMEOUT_S} s:\n"
                    f"{out[-3000:]}\n{err[-5000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _without_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k not in _TIMES}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def _run_both(tmp_path: Path, args: list[str], *, shared_cache: bool = True) -> tuple[dict, dict, str]:
    """The results of one process and of two processes, and what the two printed."""
    results = []
    for processes in (1, 2):
        out = tmp_path / f"result{processes}.json"
        cache = tmp_path / ("cache" if shared_cache else f"cache{processes}")
        run = _eval(tmp_path, processes, [*args, "--out", str(out)], cache)
        assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
        results.append((json.loads(out.read_text()), run.stdout))
    (one, _), (two, printed) = results
    return one, two, printed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gpt2_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tiny_model("gpt2", vocab_size=len(gpt2_tokenizer)).save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Two processes against one
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_write_the_single_process_result(tmp_path, model_dir, counterfact_path):
    # 5 cases, 2 per post-edit batch: the pre-edit chunk goes to process 0, the 3 batches to processes 1, 0, 1
    args = ["--model", str(model_dir), "--method", "ft", "--layer", "1", "--set", "num_steps=2", "--data",
            str(counterfact_path), "--num-cases", "5", "--cases-per-batch", "2", "--no-progress"]
    one, two, printed = _run_both(tmp_path, args)
    assert one["timing"]["processes"] == 1 and two["timing"]["processes"] == 2
    assert _without_times(two) == _without_times(one)  # every per-case number, bit for bit, in case order
    raw = json.loads(counterfact_path.read_text())[:5]
    assert [c["case_id"] for c in two["cases"]] == [r["case_id"] for r in raw]
    assert all(c["edit"]["ok"] and "pre" in c and "post" in c for c in two["cases"])
    assert printed.count("protocol=single") == 1  # only the main process prints the table
    assert "post (n=5)" in printed and f"wrote {tmp_path / 'result2.json'}" in printed


@pytest.mark.slow
def test_statistics_are_computed_together_also_by_a_process_without_edits(tmp_path, model_dir, counterfact_path,
                                                                            wikitext_path):
    # 2 cases in one post-edit batch: process 1 makes both edits, process 0 none.  ROME reads its statistics at its
    # first edit, and computing them is collective, so process 0 must compute them before the cases are shared out.
    args = ["--model", str(model_dir), "--method", "rome", "--layer", "1", "--set", "v_num_grad_steps=4",
            "--set", "mom2_max_length=64", "--set", 'context_templates=["{}", "Hello world. {}"]',
            "--stats-data", str(wikitext_path), "--stats-samples", "200", "--data", str(counterfact_path),
            "--num-cases", "2", "--cases-per-batch", "2", "--no-progress"]
    one, two, _ = _run_both(tmp_path, args, shared_cache=False)
    from hf_edit.stats import SecondMomentStats

    (path,) = (tmp_path / "cache2").rglob("*.safetensors")
    assert SecondMomentStats.load(path).metadata["world_size"] == 2  # computed by both processes together

    # Statistics summed in another order differ in the last bits (their fingerprints differ); the scores do not.
    def numbers(result: dict) -> dict:
        result = _without_times(result)
        for case in result["cases"]:
            for info in case["edit"]["info"].values():
                info.pop("stats_fingerprint")
        return result

    a, b = numbers(one), numbers(two)
    assert _close(b, a)


def _close(a: Any, b: Any, tol: float = 1e-5) -> bool:
    """Structural equality with floats equal to ``tol`` (relative or absolute)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (a, b)
        return all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (a, b)
        return all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        assert b == pytest.approx(a, rel=tol, abs=tol), (a, b)
        return True
    assert a == b, (a, b)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Without launching
# ----------------------------------------------------------------------------------------------------------------
def test_the_sequential_protocol_is_refused_under_several_processes(monkeypatch, gpt2_tokenizer, counterfact_path):
    from hf_edit import EditedModel, FTConfig
    from hf_edit.evaluation import evaluate_model, runner

    with pytest.raises(ConfigError, match="sequential protocol cannot be shared out across 2 processes"):
        runner.check_protocol_processes("sequential", 2)
    runner.check_protocol_processes("sequential", 1)
    runner.check_protocol_processes("single", 8)

    monkeypatch.setattr(runner, "_process_group", lambda: ProcessGroup(0, 2))  # as under a launcher
    edited = EditedModel(tiny_model("gpt2", vocab_size=len(gpt2_tokenizer)), gpt2_tokenizer, progress=False)
    with pytest.raises(ConfigError, match="Run it in one process"):  # refused before anything is collective
        evaluate_model(edited, counterfact_path, method=FTConfig(layers=(1,)), protocol="sequential", n=2,
                       progress=False)


def test_outside_a_process_group_everything_runs_here(monkeypatch, caplog):
    from hf_edit.evaluation import runner

    assert runner.main_process_first(lambda: 42, "answering") == 42
    assert runner._process_group() is None
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched, but nobody initialised torch.distributed
    assert runner._process_group() is None
    assert "this process evaluates every case itself" in caplog.text
