"""GPU benchmark: ROME edits, batched MEMIT edits, statistics throughput and evaluation speed on full-size shapes.

Builds GPT-2 XL-shaped (48 layers, d 1600, d_ff 6400) and Llama-2-7B-shaped (32 layers, d 4096, d_ff 11008)
models from configs with random weights, directly on the GPU (time and memory do not depend on the weights' values),
and reports in bf16 and fp32:

* statistics: keys/s (tokens/s) of the second-moment computation of the edited layer;
* one ROME edit: median seconds of ``--runs`` edits after a warm-up, and peak GPU memory;
* 100 batched edits with MEMIT (when the method is registered), median seconds and peak memory;
* evaluation: single-protocol cases/s with ROME on ``--eval-cases`` CounterFact cases (no generation).

Compare with the ROME paper's "≈2 s per edit on an A6000" for GPT-2 XL and EasyEdit's reported ~5 s and 31 GB for
ROME on Llama-2-7B.  ``--smoke`` runs tiny shapes on the CPU to check the script.

    python benchmarks/bench_gpu.py --data-dir DIR --out results.json
"""

from __future__ import annotations

import argparse
import json
import warnings
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from hf_edit import EditedModel, EditRequest, ROMEConfig  # noqa: E402
from hf_edit.architecture import resolve_target  # noqa: E402
from hf_edit.methods import available_methods, get_method  # noqa: E402
from hf_edit.stats import compute_second_moment  # noqa: E402

SHAPES = {
    "gpt2-xl": dict(model_type="gpt2", n_embd=1600, n_layer=48, n_head=25, n_inner=6400, n_positions=1024,
                    vocab_size=50257),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       vocab_size=50257),
}
SMOKE = {
    "gpt2-xl": dict(model_type="gpt2", n_embd=64, n_layer=4, n_head=4, n_inner=128, n_positions=128,
                    vocab_size=50257),
    "llama-2-7b": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, vocab_size=50257),
}
#: The layer ROME edits (the reference's gpt2-xl preset; layer 5 as for GPT-J on the 32-layer Llama shape).
ROME_LAYER = {"gpt2-xl": 17, "llama-2-7b": 5}
REQUEST = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower", target_new="Rome")


def build(name: str, dtype: torch.dtype, device: str, smoke: bool) -> torch.nn.Module:
    values = dict((SMOKE if smoke else SHAPES)[name])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bench_model(name: str, dtype: torch.dtype, args: argparse.Namespace, tokenizer, cases, batch_cases) -> dict:
    device = args.device
    row: dict = {"model": name, "dtype": str(dtype).removeprefix("torch.")}
    clock = time.perf_counter()
    model = build(name, dtype, device, args.smoke)
    row["build_s"] = time.perf_counter() - clock
    row["parameters_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    layer = min(ROME_LAYER[name], model.config.num_hidden_layers - 1)
    target = resolve_target(model, layer)
    data = str(args.data_dir / "wiki.valid.raw")

    # statistics throughput (one layer, float64 accumulation, hf_edit's default)
    reset_peak(device)
    holder = {}
    seconds = timed(lambda: holder.update(stats=compute_second_moment(
        model, tokenizer, target, dataset=data, n_samples=args.stats_texts, max_length=args.max_length,
        progress=False)), device)
    stats = holder["stats"]
    row["stats"] = {"texts": args.stats_texts, "tokens": stats.count, "seconds": seconds,
                    "tokens_per_s": stats.count / seconds, "peak_gib": peak_gib(device)}
    print(f"[{name} {row['dtype']}] statistics: {stats.count} tokens in {seconds:.2f} s "
          f"({stats.count / seconds:,.0f} tokens/s)", flush=True)

    # one ROME edit (statistics given; templates sampled once in the warm-up)
    config = ROMEConfig(layers=layer, mom2_dataset=data, mom2_n_samples=args.stats_texts,
                        mom2_max_length=args.max_length, guard=False)
    edited = EditedModel(model, tokenizer, method=config, stats={target.name: stats}, progress=False)
    edited.edit(REQUEST)
    edited.remove_edit(0)
    times, peaks = [], []
    for _ in range(args.runs):
        reset_peak(device)
        times.append(timed(lambda: edited.edit(REQUEST), device))
        peaks.append(peak_gib(device))
        edited.remove_edit(0)
    row["rome_edit"] = {"median_s": median(times), "runs_s": times, "peak_gib": max(p or 0 for p in peaks)}
    print(f"[{name} {row['dtype']}] one ROME edit: median {median(times):.2f} s of {args.runs}, "
          f"peak {row['rome_edit']['peak_gib']} GiB", flush=True)

    # evaluation: single protocol with ROME
    if cases is not None and not args.skip_eval:
        from hf_edit.evaluation import evaluate_model

        reset_peak(device)
        result = evaluate_model(edited, cases, method=config, protocol="single", progress=False)
        row["eval"] = {"cases": len(result.cases), "cases_per_s": result.timing["cases_per_second"],
                       "peak_gib": peak_gib(device)}
        print(f"[{name} {row['dtype']}] evaluation: {row['eval']['cases_per_s']:.3f} cases/s", flush=True)

    # 100 batched edits with MEMIT
    if "memit" in available_methods() and not args.skip_memit and batch_cases is not None:
        memit = get_method("memit").config_class
        n_layers = model.config.num_hidden_layers
        layers = tuple(range(max(0, layer - 4), layer + 1)) if n_layers > 8 else (0, 1)
        names = {f for f in memit.__dataclass_fields__}
        values = dict(layers=layers, mom2_dataset=data, mom2_n_samples=args.stats_texts,
                      mom2_max_length=args.max_length)
        mconfig = memit(**{k: v for k, v in values.items() if k in names})
        requests = [c.request for c in batch_cases.cases[:args.batch_edits]]
        runner = EditedModel(model, tokenizer, method=mconfig, progress=False)
        times, peaks = [], []
        for _ in range(max(1, args.runs // 2)):
            reset_peak(device)
            times.append(timed(lambda: runner.edit(requests), device))
            peaks.append(peak_gib(device))
            runner.remove_edit(0)
        row["memit_batch"] = {"edits": len(requests), "layers": list(layers), "median_s": median(times),
                              "runs_s": times, "peak_gib": max(p or 0 for p in peaks),
                              "note": "first run includes computing the statistics of the extra layers"}
        print(f"[{name} {row['dtype']}] MEMIT {len(requests)} edits: median {median(times):.2f} s", flush=True)
    edited = model = None  # free the GPU memory before the next model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    parser.add_argument("--data-dir", type=Path, default=shared / "corpus" / "wikitext-2-raw",
                        help="folder with wiki.valid.raw")
    parser.add_argument("--tokenizer", default=str(shared / "tokenizers" / "gpt2"))
    parser.add_argument("--counterfact", default=str(shared / "counterfact" / "counterfact-subset.json"))
    parser.add_argument("--models", nargs="+", default=["gpt2-xl", "llama-2-7b"])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stats-texts", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval-cases", type=int, default=20)
    parser.add_argument("--batch-edits", type=int, default=100)
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--skip-memit", action="store_true")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script on a CPU)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # edits of random-weight models do not "take"; the timings are the point
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    cases = None
    if Path(args.counterfact).exists():
        from hf_edit.evaluation import load_eval_data

        cases = load_eval_data(args.counterfact, n=max(args.eval_cases, args.batch_edits))
        cases_eval = type(cases)(cases=cases.cases[:args.eval_cases], data_format=cases.data_format,
                                 source=cases.source, fingerprint=cases.fingerprint, n_total=cases.n_total)
    else:
        cases_eval = None
    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                   "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()}
    print(json.dumps(environment), flush=True)
    rows = []
    for name in args.models:
        for dtype_name in args.dtypes:
            try:
                rows.append(bench_model(name, getattr(torch, dtype_name), args, tokenizer, cases_eval, cases))
            except Exception as err:  # keep the other rows
                print(f"[{name} {dtype_name}] failed: {type(err).__name__}: {err}", flush=True)
                rows.append({"model": name, "dtype": dtype_name, "error": f"{type(err).__name__}: {err}"})
            if args.out:
                args.out.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2))
    print("\n| model | dtype | stats tokens/s | ROME edit s | ROME peak GiB | eval cases/s | MEMIT 100 s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['dtype']} | error: {r['error'][:60]} | | | | |")
            continue
        memit = r.get("memit_batch", {}).get("median_s")
        ev = r.get("eval", {}).get("cases_per_s")
        print(f"| {r['model']} | {r['dtype']} | {r['stats']['tokens_per_s']:,.0f} | {r['rome_edit']['median_s']:.2f} | "
              f"{r['rome_edit']['peak_gib'] or 0:.1f} | {ev if ev is None else f'{ev:.2f}'} | "
              f"{memit if memit is None else f'{memit:.1f}'} |")


if __name__ == "__main__":
    main()
