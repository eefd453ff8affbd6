"""Data-parallel second-moment statistics: 2 CPU processes (gloo) against one.

The multi-process tests launch this very file with ``torch.distributed.run --standalone`` (it picks a free port);
each process initialises ``accelerate.PartialState`` (or :func:`hf_edit.stats.init_distributed`) and calls
:func:`hf_edit.stats.load_or_compute_stats`, as a script run by ``accelerate launch`` would.  The single-process
reference is computed in the test process itself, on the same tiny GPT-2 (built from a config with a fixed seed),
the real GPT-2 tokenizer and the same WikiText lines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

N_TEXTS, N_SAMPLES, MAX_LEN, LAYER = 200, 60, 64, 1
LAUNCH_TIMEOUT_S = 300
_LAUNCHER_ENV_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_", "PET_")
_LAUNCHER_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"}


def _setup(tokenizer_path: str, wikitext_path: str):
    """The tiny model, tokenizer, data set and edit target, built the same way in every process."""
    import datasets
    from tiny_models import tiny_model
    from transformers import AutoTokenizer

    from hf_edit.architecture import resolve_target

    model = tiny_model("gpt2", vocab_size=50257)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    lines = Path(wikitext_path).read_text(encoding="utf-8").splitlines()[:N_TEXTS]
    dataset = datasets.Dataset.from_dict({"text": lines})
    return model, tokenizer, dataset, resolve_target(model, LAYER)


def _stats_kwargs(dataset, cache_dir) -> dict:
    return {"dataset": dataset, "n_samples": N_SAMPLES, "max_length": MAX_LEN, "progress": False,
            "cache_dir": cache_dir}


# ----------------------------------------------------------------------------------------------------------------
# The worker (one launched process)
# ----------------------------------------------------------------------------------------------------------------
def _worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--wikitext", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--init", choices=["accelerate", "hf_edit"], default="accelerate")
    parser.add_argument("--fail", choices=["none", "raise", "exit", "disagree"], default="none")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    import torch.distributed as dist

    from hf_edit.stats import init_distributed, load_or_compute_stats

    if args.init == "accelerate":
        from accelerate import PartialState

        PartialState(cpu=True)
    else:
        init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model, tokenizer, dataset, target = _setup(args.tokenizer, args.wikitext)
    kwargs = _stats_kwargs(dataset, args.cache)
    if rank == 1 and args.fail == "disagree":
        kwargs["n_samples"] += 1
    elif rank == 1 and args.fail != "none":
        def crash(*_):
            if args.fail == "exit":
                os._exit(3)  # a hard crash: no exception, no clean-up
            raise RuntimeError("injected failure on rank 1")

        model.register_forward_pre_hook(crash)
    stats = load_or_compute_stats(model, tokenizer, target, **kwargs)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world_size": world_size, "fingerprint": stats.fingerprint(), "count": stats.count,
         "metadata": stats.metadata, "from_cache": stats.from_cache, "path": str(stats.path)}))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------------------------
def _launch(tmp_path: Path, data: tuple[Path, Path], cache: Path, out: Path,
            *extra: str) -> subprocess.CompletedProcess:
    """Run 2 processes of this file's worker; kill the whole process group if it overruns the timeout."""
    tokenizer_path, wikitext_path = data
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_ENV and not k.startswith(_LAUNCHER_ENV_PREFIXES)}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"), HF_EDIT_CACHE=str(tmp_path / "hf_edit"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--max_restarts", "0", "--monitor_interval", "0.5", str(Path(__file__).resolve()), "--worker",
               "--tokenizer", str(tokenizer_path), "--wikitext", str(wikitext_path), "--cache", str(cache),
               "--out", str(out), *extra]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"2-process statistics did not finish within {LAUNCH_TIMEOUT_S} s:\n{output[-5000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output, None)


def _cache_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def data(shared_data, wikitext_path) -> tuple[Path, Path]:
    """The GPT-2 tokenizer folder and the WikiText file."""
    tokenizer_path = shared_data / "tokenizers" / "gpt2"
    if not tokenizer_path.exists():
        pytest.skip(f"shared data not found: {tokenizer_path}")
    return tokenizer_path, wikitext_path


@pytest.fixture
def single_process(tmp_path, data):
    """The single-process statistics and their cache file."""
    from hf_edit.stats import load_or_compute_stats

    model, tokenizer, dataset, target = _setup(*map(str, data))
    cache = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes: the same float32 kernels compute the keys
    try:
        stats = load_or_compute_stats(model, tokenizer, target, **_stats_kwargs(dataset, cache))
    finally:
        torch.set_num_threads(threads)
    (path,) = _cache_files(cache)
    return stats, path


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_write_the_single_process_cache_file(tmp_path, data, single_process):
    pytest.importorskip("accelerate")
    from hf_edit.stats import SecondMomentStats

    reference, reference_path = single_process
    cache, out = tmp_path / "two", tmp_path / "out"
    result = _launch(tmp_path, data, cache, out)
    assert result.returncode == 0, result.stdout[-5000:]

    (path,) = _cache_files(cache)  # one file, no temporary file left behind
    assert path.name == reference_path.name  # same cache key
    stats = SecondMomentStats.load(path)
    assert stats.metadata["world_size"] == 2 and reference.metadata["world_size"] == 1
    ignored = {"world_size", "hf_edit_version"}
    assert {k: v for k, v in stats.metadata.items() if k not in ignored} == \
           {k: v for k, v in reference.metadata.items() if k not in ignored}
    assert stats.count == reference.count and stats.dtype == reference.dtype == torch.float64
    c1, c2 = reference.second_moment(), stats.second_moment()
    assert ((c2 - c1).abs().max() / c1.abs().max()).item() <= 1e-12

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["fingerprint"] == stats.fingerprint() for r in ranks)
    assert ranks[0]["metadata"] == ranks[1]["metadata"] == stats.metadata
    assert all(r["path"] == str(path) and not r["from_cache"] for r in ranks)

    # A second launch finds the file: both processes read it, nothing is recomputed or rewritten.
    mtime = path.stat().st_mtime_ns
    again = _launch(tmp_path, data, cache, out, "--init", "hf_edit")
    assert again.returncode == 0, again.stdout[-5000:]
    assert _cache_files(cache) == [path] and path.stat().st_mtime_ns == mtime
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["from_cache"] and r["fingerprint"] == stats.fingerprint() for r in ranks)


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["raise", "exit", "disagree"])
def test_a_failing_process_leaves_no_cache_file(tmp_path, data, failure):
    cache, out = tmp_path / "cache", tmp_path / "out"
    result = _launch(tmp_path, data, cache, out, "--init", "hf_edit", "--fail", failure)
    assert result.returncode != 0
    assert _cache_files(cache) == []  # neither the cache file nor a temporary file
    assert not list(out.glob("rank*.json"))
    if failure == "raise":  # both processes end with an error instead of waiting for each other
        assert "injected failure on rank 1" in result.stdout
        assert "Process 1 of 2 failed" in result.stdout
    elif failure == "exit":  # the launcher saw rank 1 die with the injected exit code (and then stopped rank 0)
        assert re.search(r"exitcode\s*:\s*3\b", result.stdout), result.stdout[-5000:]
    else:  # rank 1 asked for other statistics: both refuse before computing anything
        assert "The 2 processes disagree" in result.stdout


def test_single_process_records_world_size_1_and_reports_cache_hits(single_process, data):
    from hf_edit.stats import load_or_compute_stats

    stats, path = single_process
    assert stats.metadata["world_size"] == 1 and stats.path == path and not stats.from_cache
    model, tokenizer, dataset, target = _setup(*map(str, data))
    again = load_or_compute_stats(model, tokenizer, target, **_stats_kwargs(dataset, path.parent))
    assert again.from_cache and again.path == path and again.fingerprint() == stats.fingerprint()
    assert again.metadata == stats.metadata


def test_batches_are_shared_out_once_and_a_single_process_runs_alone():
    from hf_edit.stats.distributed import ProcessGroup, current_group

    groups = [ProcessGroup(rank, 4) for rank in range(4)]
    assert all(sum(group.owns(index) for group in groups) == 1 for index in range(23))
    assert [index for index in range(10) if groups[1].owns(index)] == [1, 5, 9]
    assert ProcessGroup(0, 4).is_main and not ProcessGroup(3, 4).is_main
    assert current_group() is None  # no process group in the test process


@pytest.mark.parametrize(("backend", "registered", "preferred", "expected"), [
    ("gloo", None, "cpu", "cpu"),
    ("cuda:nccl,cpu:gloo", None, "cpu", "cpu"),  # a device-to-backend list
    ("unknown", None, "cpu", "cpu"),             # a backend torch does not know: the CPU
    ("custom", ["meta"], "meta", "meta"),        # a registered backend that reduces the preferred device: kept
    ("custom", ["cpu", "meta"], "meta", "meta"),
    ("custom", ["cpu"], "meta", "cpu"),          # … that does not: the CPU
])
def test_collectives_run_on_a_device_the_backend_reduces(monkeypatch, backend, registered, preferred, expected):
    import torch.distributed as dist

    from hf_edit.stats.distributed import _collective_device

    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: backend)
    if registered is not None:  # what torch.distributed.Backend.register_backend(devices=...) records
        monkeypatch.setattr(dist.Backend, "backend_capability",
                            {**dist.Backend.backend_capability, backend: registered})
    assert _collective_device(torch.device(preferred)) == torch.device(expected)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker([a for a in sys.argv[1:] if a != "--worker"])
