"""Generated tokens/s of the native rollout engine (shared prefill on/off) against transformers
`generate`, on the same weights and the same batch.

    python benchmarks/rollout_throughput.py                      # CPU, fp32, 1 thread, the committed run
    python benchmarks/rollout_throughput.py --threads 2 --repeats 5
    python benchmarks/rollout_throughput.py --device cuda --dtype bfloat16 --prompts 64   # on a GPU

Model: the embedded tiny Qwen2 shape (`polopt.models.TINY_ARITH`: 4 layers, dim 128, vocab 320)
with random weights, built in torchtune and copied into `transformers.Qwen2ForCausalLM` with
torchtune's converter (the two give the same logits; the script checks). Batch: `--prompts`
prompts of random length in [3/4·L, L] (left-padded), `--samples` answers each, `--new-tokens`
new tokens with no stop token, so every engine generates exactly prompts × samples × new_tokens
tokens. transformers samples with `num_return_sequences` (it prefills each prompt once per
answer, as the native engine does with `shared_prefill=False`); the native engine also returns
per-token log-probs, transformers here does not (it would only get slower).

Three warm-ups per engine, then `--repeats` rounds in which each engine runs once, back to back
(order rotating). Reported: median wall time per engine, and the median over rounds of the
per-round speedup against transformers: a slow spell of a shared machine then hits every engine of
that round alike, so the ratio is steadier than a ratio of medians. Writes
benchmarks/results/rollout_throughput.{md,json} with machine, versions, date and command.
A figure, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from loss_overhead import synchronize  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def build_models(device: str, dtype: torch.dtype, seed: int):
    import transformers
    from torchtune.models.qwen2 import qwen2
    from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

    from polopt.models import TINY_ARITH

    cfg = TINY_ARITH
    torch.manual_seed(seed)
    tune = qwen2(attn_dropout=0.0, **cfg)
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
    hf_state = qwen2_tune_to_hf(
        tune.state_dict(), num_heads=cfg["num_heads"], num_kv_heads=cfg["num_kv_heads"], dim=cfg["embed_dim"],
        tie_word_embeddings=cfg["tie_word_embeddings"],
    )
    hf.load_state_dict(hf_state, strict=False)
    hf.tie_weights()
    tune, hf = tune.to(device=device, dtype=dtype).eval(), hf.to(device=device, dtype=dtype).eval()
    x = torch.randint(1, cfg["vocab_size"], (2, 16), device=device)
    with torch.no_grad():
        max_diff = (tune(x).float() - hf(x).logits.float()).abs().max().item()
    return tune, hf, max_diff


def make_prompts(num_prompts: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(prompt_len * 3 // 4, prompt_len + 1, (num_prompts,), generator=g)
    return [torch.randint(1, vocab, (int(n),), generator=g).tolist() for n in lengths]


def interleaved_times(engines: dict, device: str, repeats: int) -> dict[str, list[float]]:
    """Seconds per run of each engine: three warm-ups each, then `repeats` rounds in which every
    engine runs once, in an order that rotates from round to round."""
    for fn in engines.values():
        for _ in range(3):
            fn()
    names = list(engines)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            engines[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def measure(args) -> dict:
    import transformers

    from polopt.rollout import NativeRolloutEngine, SamplingParams

    dtype = getattr(torch, args.dtype)
    tune, hf, max_diff = build_models(args.device, dtype, args.seed)
    vocab = tune.tok_embeddings.num_embeddings
    prompts = make_prompts(args.prompts, args.prompt_len, vocab, args.seed)
    pad_id = 0
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=args.seed)
    tokens = args.prompts * args.samples * args.new_tokens

    def native(shared: bool):
        engine = NativeRolloutEngine(tune, pad_id=pad_id, decode=lambda ids: "", shared_prefill=shared)

        def run():
            groups = engine.generate(prompts, args.samples, params)
            assert sum(len(c.token_ids) for g in groups for c in g) == tokens

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
        min_new_tokens=args.new_tokens, num_return_sequences=args.samples, pad_token_id=pad_id,
        eos_token_id=None, bos_token_id=None,
    )

    def hf_generate():
        torch.manual_seed(args.seed)
        with torch.no_grad():
            out = hf.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config)
        assert out.shape == (len(prompts) * args.samples, P + args.new_tokens)

    engines = {
        "native, shared prefill": native(True),
        "native, per-sample prefill": native(False),
        "transformers generate": hf_generate,
    }
    times = interleaved_times(engines, args.device, args.repeats)
    results = {}
    for name, seconds in times.items():
        ratios = [hf / own for hf, own in zip(times["transformers generate"], seconds)]
        results[name] = {
            "seconds": statistics.median(seconds),
            "min_seconds": min(seconds),
            "tokens_per_s": tokens / statistics.median(seconds),
            # per round: the engines ran back to back, so a slow spell of a shared machine hits both
            "speedup_vs_transformers": statistics.median(ratios),
            "speedup_vs_transformers_min": min(ratios),
            "speedup_vs_transformers_max": max(ratios),
        }
        r = results[name]
        print(f"{name:28s} {r['seconds']*1000:9.1f} ms  {r['tokens_per_s']:10.0f} tokens/s  "
              f"{r['speedup_vs_transformers']:.2f}x transformers", flush=True)
    on_gpu = args.device.startswith("cuda")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable.split("/")[-1], *sys.argv]),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if on_gpu else (platform.processor() or platform.machine()),
        "ran_on_gpu": on_gpu,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torchtune": __import__("torchtune").__version__,
        "dtype": args.dtype,
        "prompts": args.prompts,
        "samples": args.samples,
        "prompt_len_max": args.prompt_len,
        "prompt_lens": [len(p) for p in prompts],
        "new_tokens": args.new_tokens,
        "generated_tokens": tokens,
        "repeats": args.repeats,
        "max_logit_diff_torchtune_vs_hf": max_diff,
        "results": results,
    }


def markdown(run: dict) -> str:
    lines = [
        "# Rollout throughput: native engine vs transformers `generate`",
        "",
        f"Date: {run['date']}. Command: `{run['command']}`.",
        f"Machine: {run['platform']}, {run['device_name']}, {run['cpu_count']} CPUs, torch threads "
        f"{run['torch_threads']}; python {run['python']}, torch {run['torch']}, torchtune {run['torchtune']}, "
        f"transformers {run['transformers']}.",
        "",
        ("Ran on GPU." if run["ran_on_gpu"] else "Not run on a GPU (none was available): CPU figures only; "
         "`--device cuda --dtype bfloat16` runs the same script unchanged on one."),
        "",
        f"Model: tiny Qwen2 (polopt.models.TINY_ARITH shape, random weights), {run['dtype']}; torchtune and "
        f"transformers copies agree to {run['max_logit_diff_torchtune_vs_hf']:.1e} in the logits. Batch: "
        f"{run['prompts']} prompts (lengths {min(run['prompt_lens'])}–{max(run['prompt_lens'])}, left-padded) × "
        f"{run['samples']} samples × {run['new_tokens']} new tokens = {run['generated_tokens']} tokens, no stop "
        f"token. Three warm-ups per engine, then {run['repeats']} rounds, each engine once per round back to "
        "back; speedup = median over rounds of the round's transformers time / engine time (range in brackets).",
        "",
        "| engine | median time (ms) | tokens/s | vs transformers (median [min–max] of rounds) |",
        "|---|---:|---:|---:|",
    ]
    for name, r in run["results"].items():
        lines.append(
            f"| {name} | {r['seconds']*1000:.1f} | {r['tokens_per_s']:.0f} | {r['speedup_vs_transformers']:.2f}× "
            f"[{r['speedup_vs_transformers_min']:.2f}–{r['speedup_vs_transformers_max']:.2f}] |"
        )
    lines += [
        "",
        "The native engine also returns the per-token sampling log-probs; transformers here does not. "
        "Shared prefill runs each prompt's prefill once and its K samples attend to that one prefix cache "
        "(their queries stacked per prompt); "
        "per-sample prefill runs it K times (as `num_return_sequences` does).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="rollout_throughput", help="results file stem")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = measure(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(run, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(run))
    print(f"wrote {RESULTS / (args.name + '.md')}")


if __name__ == "__main__":
    main()
