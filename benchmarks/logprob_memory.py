"""Peak memory and time of forward+backward of the log-prob path: fused chunked vs materialised.

    python benchmarks/logprob_memory.py                    # CPU: N=8192, D=512, V=32000, fp32
    python benchmarks/logprob_memory.py --device cuda      # GPU: N=16384, D=1536, V=151936, bf16

One timed step is what the trainer does after the model: hidden [N, D] (grad) and the output weight
[V, D] (grad) → per-token log-probs (+ entropy, as the recipe asks) → Σ upstream·log-probs →
backward to hidden and weight. Variants:

    materialised   logits = h·Wᵀ [N, V], log_softmax in fp32, gather (response_logprobs(fused=False))
    fused          polopt.ops.token_logprobs, chunk_size rows of logits at a time
    (GPU only) fused+grpo and materialised+grpo: the same followed by polopt's GRPO loss, and
    liger_grpo: Liger-Kernel's LigerFusedLinearGRPOLoss on the same inputs, if it imports.

Each variant runs in a fresh subprocess. Peak memory on CPU is ru_maxrss (the process's peak RSS)
minus ru_maxrss right after the inputs were allocated and a small warm-up ran; on GPU it is
torch.cuda.max_memory_allocated minus memory allocated after the inputs. Time: median of
--repeats steps after one warm-up step (the peak is taken over the first step and all that follow).
Writes benchmarks/results/logprob_memory.{md,json}: machine, versions, date, exact command.
A figure, not a test: nothing asserts a time.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from _common import REPO, RESULTS, environment, synchronize  # benchmarks/ is on sys.path when run as a script
CPU_SHAPE = dict(tokens=8192, dim=512, vocab=32000, dtype="float32")
GPU_SHAPE = dict(tokens=16384, dim=1536, vocab=151936, dtype="bfloat16")


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def make_step(variant: str, hidden, weight, targets, upstream, chunk_size: int, group_size: int):
    """A closure running one forward+backward of `variant`; grads land in hidden/weight .grad."""
    from polopt.ops import materialized_token_logprobs, token_logprobs

    def logprobs_of(fused: bool):
        if fused:
            return token_logprobs(hidden, weight, targets, chunk_size=chunk_size, return_entropy=True)
        return materialized_token_logprobs(hidden, weight, targets, return_entropy=True)

    if variant in ("fused", "materialised"):
        def step():
            hidden.grad = weight.grad = None
            logprobs, _entropy = logprobs_of(variant == "fused")
            (logprobs * upstream).sum().backward()
        return step

    # Loss variants: rows = sequences of `seq_len` tokens, groups of `group_size` sequences.
    from polopt.losses import get_loss

    num_seqs = max(group_size, hidden.shape[0] // 4096)
    seq_len = hidden.shape[0] // num_seqs
    generator = torch.Generator().manual_seed(1)
    rewards = torch.randint(0, 2, (num_seqs,), generator=generator).float().to(hidden.device)
    group_ids = (torch.arange(num_seqs) // group_size).to(hidden.device)
    mask = torch.ones(num_seqs, seq_len, dtype=torch.bool, device=hidden.device)

    if variant == "liger_grpo":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        advantages = (rewards - rewards.view(-1, group_size).mean(1).repeat_interleave(group_size)).float()
        # loss_type="grpo": per-sequence mean then batch mean, as polopt's grpo (Liger's default is dapo)
        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo")

        def step():
            hidden.grad = weight.grad = None
            out = liger(hidden.view(num_seqs, seq_len, -1), weight, targets.view(num_seqs, seq_len), mask.long(), advantages)
            (out[0] if isinstance(out, (tuple, list)) else out).backward()
        return step

    grpo = get_loss("grpo")
    fused = variant == "fused+grpo"
    old_logprobs = None

    def step():
        nonlocal old_logprobs
        hidden.grad = weight.grad = None
        logprobs, _entropy = logprobs_of(fused)
        logprobs = logprobs.view(num_seqs, seq_len)
        if old_logprobs is None:
            old_logprobs = logprobs.detach() + 0.01
        grpo(logprobs, old_logprobs, mask, rewards, group_ids).loss.backward()
    return step


def worker(args) -> dict:
    """Runs in a fresh process: one variant, prints its JSON line."""
    torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.dim, generator=generator).to(device, dtype).requires_grad_(True)
    weight = (0.02 * torch.randn(args.vocab, args.dim, generator=generator)).to(device, dtype).requires_grad_(True)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device)
    upstream = torch.randn(args.tokens, generator=generator).to(device)

    # Warm up kernels/allocator on a slice small enough not to set the peak.
    small = slice(0, 64)
    from polopt.ops import token_logprobs

    token_logprobs(hidden[small].detach().requires_grad_(True), weight, targets[small], chunk_size=64).sum().backward()
    weight.grad = None
    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _rss_bytes()

    step = make_step(args.variant, hidden, weight, targets, upstream, args.chunk_size, args.group_size)
    times = []
    for _ in range(args.repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda") else _rss_bytes()) - baseline
    return {
        "variant": args.variant,
        "peak_bytes": peak,
        "seconds": statistics.median(times[1:]),
        "min_seconds": min(times[1:]),
        "first_seconds": times[0],
        "torch_threads": torch.get_num_threads(),
    }


def run_variant(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--device", args.device, "--tokens", str(args.tokens),
           "--dim", str(args.dim), "--vocab", str(args.vocab), "--dtype", args.dtype, "--chunk-size", str(args.chunk_size),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--group-size", str(args.group_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"variant": variant, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(runs: list[dict]) -> str:
    lines = [
        "# Log-prob path: peak memory and time, fused chunked vs materialised logits",
        "",
        "Forward+backward of hidden [N, D] · weight [V, D] → per-token log-probs and entropy → backward to",
        "hidden and weight; each variant in a fresh process (`benchmarks/logprob_memory.py`). Peak memory is",
        "above the inputs: CPU peak RSS (ru_maxrss) minus RSS after allocating inputs; GPU",
        "max_memory_allocated minus allocated after inputs. Target (issue 6): fused peak ≤ 0.2×",
        "materialised, time ≤ 1.0×.",
        "",
    ]
    for run in runs:
        env = run["env"]
        lines += [
            f"## {env['device']} ({env['device_name']})",
            "",
            f"N = {run['tokens']}, D = {run['dim']}, V = {run['vocab']}, {run['dtype']}, chunk_size = {run['chunk_size']}, "
            f"median of {run['repeats']} after one warm-up step, torch threads {run['threads']}. "
            f"Machine: {env['platform']}, {env['cpu_count']} CPUs; Python {env['python']}, torch {env['torch']}"
            f"{', CUDA ' + env['cuda'] if env.get('cuda') else ''}; {env['date']}.",
            f"Command: `{env['command']}`",
            "",
            "| variant | peak MiB | × materialised | s (median) | s (fastest) | × materialised |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        ref = next((r for r in run["rows"] if r["variant"] == "materialised" and "error" not in r), None)
        for r in run["rows"]:
            if "error" in r:
                lines.append(f"| {r['variant']} | not run: {r['error']} | | | | |")
                continue
            mem_x = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}" if ref else "–"
            time_x = f"{r['seconds'] / ref['seconds']:.2f}" if ref else "–"
            lines.append(
                f"| {r['variant']} | {r['peak_bytes'] / 2**20:.0f} | {mem_x} | {r['seconds']:.2f} | {r['min_seconds']:.2f} | {time_x} |"
            )
        if run.get("note"):
            lines += ["", run["note"]]
        lines.append("")
    if not any(run["env"]["device"].startswith("cuda") for run in runs):
        lines += [
            "## GPU",
            "",
            "Not run: no GPU was lent to the session that wrote this file. `--device cuda` runs N = 16384,",
            "D = 1536, V = 151936 in bf16 against materialised logits, the same two followed by polopt's GRPO",
            "loss, and Liger-Kernel's LigerFusedLinearGRPOLoss when `liger_kernel` imports.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--dim", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per variant process")
    parser.add_argument("--group-size", type=int, default=4, help="GPU loss variants: sequences per group")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = GPU_SHAPE if args.device.startswith("cuda") else CPU_SHAPE
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker:
        args.variant = args.worker
        print(json.dumps(worker(args)))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch here")

    variants = ["materialised", "fused"]
    if args.device.startswith("cuda"):
        variants += ["materialised+grpo", "fused+grpo", "liger_grpo"]
    rows = []
    for variant in variants:
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        rows.append(run_variant(args, variant))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    run = {"env": environment(args.device), "tokens": args.tokens, "dim": args.dim, "vocab": args.vocab, "dtype": args.dtype,
           "chunk_size": args.chunk_size, "repeats": args.repeats, "threads": args.threads, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "logprob_memory.json"
    runs = json.loads(json_path.read_text()) if json_path.exists() else []
    runs = [r for r in runs if r["env"]["device"] != run["env"]["device"]] + [run]  # one run per device
    json_path.write_text(json.dumps(runs, indent=1) + "\n")
    (RESULTS / "logprob_memory.md").write_text(markdown(runs))
    print(markdown([run]))


if __name__ == "__main__":
    main()
