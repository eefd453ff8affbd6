"""Benchmark one ROME edit, one FT / FT+L edit and the second-moment statistics on the models in ../shared/data.

    python benchmarks/bench_rome.py [--runs 5] [--device cpu|cuda] [--models cf-facts-gpt2 stories260K gpt2-tiny]

Prints one table per measurement, each a median over ``--runs`` runs with the spread (min–max):

* one edit: wall time, peak memory added during the edit (CPU: resident set size sampled every 2 ms; CUDA:
  ``max_memory_allocated``), forward/backward passes, and the split between templates, key, v* and solve;
* the same edit computed the way the reference implementation does it (full-vocabulary logits at every position,
  a separate forward pass for the bare-prompt key), timed in the same run: the "ratio" column is hf_edit / reference;
* FT and FT+L (their presets/defaults): time per edit and peak memory;
* statistics throughput in tokens per second.

``gpt2-tiny`` is a randomly initialised 3-layer GPT-2 with the real 50,257-token vocabulary: its cost is dominated by
the vocabulary projection, like the large GPT-2 models'.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_edit import EditedModel, EditRequest, ROMEConfig
from hf_edit.architecture import base_layer
from hf_edit.hooks import add_at_positions, capture
from hf_edit.methods import EditContext
from hf_edit.methods.rome import ROMEEditor
from hf_edit.stats import compute_second_moment
from hf_edit.tokens import pad_batch, pad_token_id, target_ids

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKITEXT = SHARED / "corpus" / "wikitext-2-raw" / "wiki.valid.raw"
_LIBC = ctypes.CDLL("libc.so.6")
REQUESTS = {
    "cf-facts-gpt2": EditRequest(prompt="{} was employed in", subject="Laurent Cars", target_new="Philadelphia"),
    "stories260K": EditRequest(prompt="{} went to the park with her", subject="Lily", target_new="dragon"),
    "gpt2-tiny": EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome"),
}


def load(name: str, device: str):
    if name == "gpt2-tiny":
        tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2")
        config = AutoConfig.for_model("gpt2", n_layer=3, n_embd=64, n_head=4, n_positions=128, bos_token_id=0,
                                      eos_token_id=0, vocab_size=len(tokenizer))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        path = SHARED / "models" / name
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@contextmanager
def peak_memory(device: str):
    """Yields a dict whose "peak" is the memory added at the peak of the block (bytes)."""
    result = {"peak": 0}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["peak"] = torch.cuda.max_memory_allocated() - start
        return
    gc.collect()
    _LIBC.malloc_trim(0)  # give freed heap back to the OS so the baseline is the memory really in use
    start, stop, peak = _rss_bytes(), threading.Event(), [0]

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak"] = max(peak[0], _rss_bytes()) - start


@contextmanager
def count_passes(model):
    """Count forward passes of the model (at its input embeddings) and backward passes (at its LM head)."""
    counts = {"forward": 0, "backward": 0}

    def count_forward(_m, _a, _out):
        counts["forward"] += 1

    def count_backward(_m, _a, out):
        if out.requires_grad:
            out.register_hook(lambda grad: counts.__setitem__("backward", counts["backward"] + 1))

    handles = [model.get_input_embeddings().register_forward_hook(count_forward),
               model.get_output_embeddings().register_forward_hook(count_backward)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def reference_style_edit(editor: ROMEEditor, request: EditRequest, target) -> None:
    """The same edit computed as the reference does: full logits everywhere and a separate bare-prompt pass.

    Used only as the timing baseline; follows rome-spec §4, §6, §7.1.
    """
    model, tokenizer, cfg = editor.model, editor.tokenizer, editor.config
    module = model.get_submodule(target.name)
    device = base_layer(module).weight.device
    contexts = [editor._encode(t, request) for t in editor.templates]
    with torch.no_grad(), capture(module, (len(contexts), max(len(c.ids) for c in contexts))) as seen:
        model(**pad_batch([c.ids for c in contexts], pad_token_id(tokenizer), device))
    u = editor.stats_for(target).solve(seen.inputs[torch.arange(len(contexts)),
                                                   torch.tensor([c.subject_last for c in contexts])].mean(0).float())
    targets = target_ids(tokenizer, request.target_new)
    kl = editor._encode("{} is a", request)
    rows = [c.ids + targets[:-1] for c in contexts] + [kl.ids]
    batch = pad_batch(rows, pad_token_id(tokenizer), device)
    positions = torch.tensor([c.subject_last for c in contexts + [kl]])
    delta = torch.zeros(target.out_features, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=cfg.v_lr)
    for it in range(cfg.v_num_grad_steps):
        optimiser.zero_grad()
        with add_at_positions(module, delta, positions, tuple(batch["input_ids"].shape)):
            log_probs = torch.log_softmax(model(**batch).logits.float(), dim=-1)
        nll = torch.stack([-log_probs[j, len(r) - len(targets) + torch.arange(len(targets)),
                                      torch.tensor(targets)].mean() for j, r in enumerate(rows[:-1])]).mean()
        loss = nll + cfg.v_weight_decay * delta.norm()
        if it == cfg.v_num_grad_steps - 1:
            break
        loss.backward()
        optimiser.step()
    bare = editor._encode("{}", request)
    with torch.no_grad(), capture(module, (1, len(bare.ids))):
        model(input_ids=torch.tensor([bare.ids], device=device))
    del u


def median_spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.3f} ({min(values):.3f}–{max(values):.3f})"


def bench_edit(name: str, runs: int, device: str, stats_samples: int) -> dict:
    model, tokenizer = load(name, device)
    request = REQUESTS[name]
    config = ROMEConfig(mom2_dataset=str(WIKITEXT), mom2_n_samples=stats_samples, mom2_max_length=128)
    probe = ROMEEditor(config, EditContext(model, tokenizer))
    target = probe.targets()[0]
    stats = probe.stats_for(target)  # computed (or read from the cache) once, outside the timings
    rows = {"hf_edit": [], "reference-style": [], "memory": [], "split": [], "passes": None, "ref_passes": None}
    for _ in range(runs):
        edited = EditedModel(model, tokenizer, method=config, stats=stats, progress=False)
        with peak_memory(device) as memory, count_passes(model) as passes:
            start = time.perf_counter()
            (edit,) = edited.edit(request)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            rows["hf_edit"].append(time.perf_counter() - start)
        rows["memory"].append(memory["peak"] / 2**20)
        rows["split"].append(edit.info["timings"])
        rows["passes"] = dict(passes)
        edited.remove_edit(0)
        editor = ROMEEditor(config, EditContext.for_model(model, tokenizer, stats=stats))
        with count_passes(model) as ref_passes:
            start = time.perf_counter()
            reference_style_edit(editor, request, target)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            rows["reference-style"].append(time.perf_counter() - start)
        rows["ref_passes"] = dict(ref_passes)
    return rows


def bench_dense(name: str, runs: int, device: str, method: str) -> dict:
    """FT or FT+L (the method's preset for the model, else its documented default) on the same request."""
    model, tokenizer = load(name, device)
    times, memory, steps = [], [], []
    for _ in range(runs):
        edited = EditedModel(model, tokenizer, method=method, progress=False)
        with peak_memory(device) as peak:
            start = time.perf_counter()
            (edit,) = edited.edit(REQUESTS[name])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        memory.append(peak["peak"] / 2**20)
        steps.append(edit.info["steps"])
        edited.remove_edit(0)
    return {"time": times, "memory": memory, "steps": steps, "layer": edit.layer}


def bench_stats(name: str, runs: int, device: str, n_texts: int) -> list[float]:
    model, tokenizer = load(name, device)
    target = ROMEEditor(ROMEConfig(), EditContext(model, tokenizer)).targets()[0]
    speeds = []
    for _ in range(runs):
        start = time.perf_counter()
        stats = compute_second_moment(model, tokenizer, target, dataset=str(WIKITEXT), n_samples=n_texts,
                                      max_length=128, progress=False)
        speeds.append(stats.count / (time.perf_counter() - start))
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["cf-facts-gpt2", "stories260K", "gpt2-tiny"])
    parser.add_argument("--stats-texts", type=int, default=2000, help="texts per statistics run")
    args = parser.parse_args()
    print(f"device: {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, runs {args.runs}\n")

    print("One ROME edit (seconds; median (min–max)); ratio = hf_edit / reference-style, same run")
    print(f"{'model':<15} {'hf_edit s':>24} {'reference-style s':>24} {'ratio':>6} {'peak MiB':>22} "
          f"{'fwd/bwd':>8} {'ref fwd/bwd':>11}")
    splits = {}
    for name in args.models:
        r = bench_edit(name, args.runs, args.device, args.stats_texts)
        ratio = statistics.median(r["hf_edit"]) / statistics.median(r["reference-style"])
        p, q = r["passes"], r["ref_passes"]
        print(f"{name:<15} {median_spread(r['hf_edit']):>24} {median_spread(r['reference-style']):>24} "
              f"{ratio:6.2f} {median_spread(r['memory']):>22} {p['forward']:>4}/{p['backward']:<3} "
              f"{q['forward']:>6}/{q['backward']:<3}")
        splits[name] = r["split"]

    print("\nSplit of one hf_edit edit (seconds, median over runs)")
    print(f"{'model':<15} {'templates':>10} {'key':>10} {'v*':>10} {'solve':>10}")
    for name, runs in splits.items():
        cols = [statistics.median(s[k] for s in runs) for k in ("templates", "key", "v_star", "solve")]
        print(f"{name:<15} " + " ".join(f"{c:10.4f}" for c in cols))

    print("\nFT and FT+L, one request (seconds and MiB; median (min–max))")
    print(f"{'model':<15} {'method':<6} {'layer':>5} {'steps':>5} {'time s':>24} {'peak MiB':>24}")
    for name in args.models:
        for method in ("ft", "ft+l"):
            r = bench_dense(name, args.runs, args.device, method)
            print(f"{name:<15} {method:<6} {r['layer']:>5} {statistics.median(r['steps']):>5.0f} "
                  f"{median_spread(r['time']):>24} {median_spread(r['memory']):>24}")

    print(f"\nSecond-moment statistics, {args.stats_texts} WikiText-2 texts (tokens/s; median (min–max))")
    for name in args.models:
        print(f"{name:<15} {median_spread(bench_stats(name, args.runs, args.device, args.stats_texts))}")


if __name__ == "__main__":
    main()
