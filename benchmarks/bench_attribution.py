"""Benchmark integrated-gradients neuron attribution (``hf_edit.attribution.integrated_gradients``).

    python benchmarks/bench_attribution.py [--runs 3] [--threads 1] [--device cpu|cuda] [--skip-7b]

Two measurements, each the median over ``--runs`` runs (min–max in brackets):

* **fact model** (``../shared/data/models/cf-facts-gpt2``: 6 layers, d_ff 1024) on a CounterFact prompt, all layers,
  ``steps=20``: ROME's chunking (``batch_size=20``), EleutherAI's (10), one point per pass (1), all layers in one
  pass (120), and the reference's pass structure (one call per layer and target token, so
  ``L·T·(1 + steps/batch_size)`` passes) for comparison;
* **7B-shaped layer**: a one-layer Llama with d = 4096, d_ff = 11008, 32 heads and a 32,000-token vocabulary
  (≈ 0.46 B parameters, fp32), a 16-token prompt, ``steps=20`` with ``batch_size`` 1, 5, 10 and 20, and
  ``steps=40`` with ``batch_size=5``: the peak memory follows ``batch_size`` and not ``steps``.

Peak memory is the memory added at the peak of the call: on CUDA ``torch.cuda.max_memory_allocated`` minus the
allocation before the call; on the CPU the resident set size sampled every 2 ms (``psutil``) minus the RSS before
the call (after ``gc.collect`` and ``malloc_trim``).  The number of CPU threads is pinned with
``torch.set_num_threads`` and printed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from _shared import fact_model_path
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_edit.attribution import integrated_gradients

FACT_PROMPT, FACT_TARGET = "Laurent Cars was employed in", "Paris"
MIB = 2 ** 20


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


@contextmanager
def peak_memory(device: str) -> Iterator[dict]:
    """Yields a dict whose ``"peak"`` is, after the block, the memory it added at its peak (bytes)."""
    result = {"peak": 0}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["peak"] = torch.cuda.max_memory_allocated() - start
        return
    import psutil

    process = psutil.Process()
    gc.collect()
    _malloc_trim()
    start, stop, peak = process.memory_info().rss, threading.Event(), [0]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak"] = max(peak[0], process.memory_info().rss) - start


def measure(fn: Callable[[], object], runs: int, device: str, warmup: bool = True) -> tuple[list[float], list[float]]:
    """Wall times (s) and peak added memory (MiB) of ``runs`` calls of ``fn`` (after one warm-up call if asked)."""
    if warmup:
        fn()
    times, peaks = [], []
    for _ in range(runs):
        with peak_memory(device) as mem:
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peaks.append(mem["peak"] / MIB)
    return times, peaks


def fmt(values: list[float], unit: str, digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} {unit} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def bench_fact_model(runs: int, device: str) -> None:
    path = fact_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    n_layers = model.config.num_hidden_layers
    targets = tokenizer(FACT_TARGET, add_special_tokens=False)["input_ids"]
    n_prompt = len(tokenizer(FACT_PROMPT)["input_ids"])
    print(f"\n## {path.name}: {n_layers} layers, d_ff {4 * model.config.n_embd}, prompt {FACT_PROMPT!r} "
          f"({n_prompt} tokens), target {FACT_TARGET!r} ({len(targets)} token(s)), steps=20, all layers")
    for space in (False, True):
        result = integrated_gradients(model, tokenizer, FACT_PROMPT, FACT_TARGET, steps=20, target_leading_space=space)
        top = [(layer, j, round(score, 4)) for layer, j, score in result.top(3)]
        print(f"target ids {list(result.target_ids)} ({'with' if space else 'without'} leading space): probability "
              f"{result.target_prob:.3f}, top neurons (layer, neuron, score) {top}")
    print("timed: the reference tokenisation (no leading space)")
    print("| variant | passes (fwd+bwd) | time | peak added memory |\n|---|---|---|---|")
    for batch_size in (20, 10, 1, 20 * n_layers):
        times, peaks = measure(lambda bs=batch_size: integrated_gradients(
            model, tokenizer, FACT_PROMPT, FACT_TARGET, steps=20, batch_size=bs), runs, device)
        passes = -(-20 * n_layers // batch_size)
        print(f"| batch_size={batch_size} | {passes} | {fmt(times, 's')} | {fmt(peaks, 'MiB', 1)} |")

    def reference_structure() -> None:
        for layer in range(n_layers):
            for token in targets:
                integrated_gradients(model, tokenizer, FACT_PROMPT, [token], layers=[layer], steps=20, batch_size=20)

    times, peaks = measure(reference_structure, runs, device)
    print(f"| reference pass structure (per layer and token, batch 20) | {n_layers * len(targets)} (+"
          f"{n_layers * len(targets)} clean) | {fmt(times, 's')} | {fmt(peaks, 'MiB', 1)} |")


def bench_7b_layer(runs: int, device: str, prompt_tokens: int) -> None:
    config = AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                  max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(3, 32000, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"\n## 7B-shaped layer: one Llama layer, d=4096, d_ff=11008, vocab 32000 ({params / 1e9:.2f} B "
          f"parameters, fp32, {params * 4 / MIB:.0f} MiB), {prompt_tokens}-token prompt, one target token")
    print("| steps | batch_size | passes | time | peak added memory | per integration point |")
    print("|---|---|---|---|---|---|")
    for i, (steps, batch_size) in enumerate(((20, 1), (20, 5), (20, 10), (20, 20), (40, 5))):
        times, peaks = measure(lambda s=steps, b=batch_size: integrated_gradients(
            model, None, prompt, [42], steps=s, batch_size=b), runs, device, warmup=i == 0)
        print(f"| {steps} | {batch_size} | {-(-steps // batch_size)} | {fmt(times, 's')} | {fmt(peaks, 'MiB', 0)} | "
              f"{statistics.median(times) / steps * 1000:.0f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length for the 7B-shaped layer")
    parser.add_argument("--skip-7b", action="store_true", help="only the fact model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
          + f", torch.get_num_threads() = {torch.get_num_threads()}, runs = {args.runs} (median [min–max])")
    bench_fact_model(args.runs, args.device)
    if not args.skip_7b:
        bench_7b_layer(args.runs, args.device, args.prompt_tokens)


if __name__ == "__main__":
    main()
