"""One full update step (forward, GRPO loss, backward, AdamW) of a Qwen2.5-1.5B-shaped torchtune
qwen2 with random weights, fused log-probs vs materialised logits: tokens/s and MFU.

    python benchmarks/step_throughput.py --device cuda                # 4 × 4096 tokens, bf16, AC on
    python benchmarks/step_throughput.py                              # CPU: scaled-down model, labelled

Each step: polopt.policy.response_logprobs(model, batch, fused=...) → polopt's GRPO loss (any
polopt loss costs the same: they all read per-token log-probs) → backward → AdamW step → zero_grad.
Sequences are 512 prompt + 3584 response tokens (4096), all real tokens.

MFU = model FLOPs per second / peak dense bf16 FLOPs of the device, with model FLOPs per step

    6 · P · tokens  +  12 · L · d · S² · B           (PaLM, appendix B; attention counted non-causal)

P = all parameters (the tied embedding counted once: it is the output projection's matmul), L
layers, d model dim, S sequence length, B sequences. Activation-checkpoint recompute is not
counted (model FLOPs, not hardware FLOPs). Peak: H100/H200 SXM 989.4 TFLOP/s bf16 dense, A100
312, or --peak-tflops.

The CPU run (no --device cuda) uses a scaled-down qwen2 (see CPU_MODEL) in fp32 and reports no
MFU; it exists to exercise the script and compare fused vs not, not to stand in for the GPU figure.
Writes benchmarks/results/step_throughput.md (this run's section; the GPU note when not on GPU). A figure, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torchtune import training
from torchtune.models.qwen2 import qwen2
from torchtune.modules import TransformerSelfAttentionLayer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, synchronize  # noqa: E402  (machine/versions block shared by benchmarks)

from polopt.batch import RolloutBatch  # noqa: E402
from polopt.losses import get_loss  # noqa: E402
from polopt.policy import response_logprobs  # noqa: E402

GPU_MODEL = dict(vocab_size=151936, num_layers=28, num_heads=12, num_kv_heads=2, embed_dim=1536, intermediate_dim=8960,
                 max_seq_len=32768, norm_eps=1e-6, rope_base=1000000.0, tie_word_embeddings=True)  # = qwen2_5_1_5b_base
CPU_MODEL = dict(vocab_size=32000, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=768,
                 max_seq_len=4096, tie_word_embeddings=True)
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def random_batch(num_seqs: int, prompt_len: int, response_len: int, vocab: int, device) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    seq = prompt_len + response_len
    group_ids = torch.arange(num_seqs) // max(1, num_seqs // 2)
    rewards = (torch.arange(num_seqs) % 2).float()
    correct_rate = torch.stack([rewards[group_ids == gid].mean() for gid in group_ids])
    return RolloutBatch(
        input_ids=torch.randint(0, vocab, (num_seqs, seq), generator=g),
        attention_mask=torch.ones(num_seqs, seq, dtype=torch.bool),
        response_mask=torch.ones(num_seqs, response_len, dtype=torch.bool),
        old_logprobs=-2.0 * torch.rand(num_seqs, response_len, generator=g),
        rewards=rewards, group_ids=group_ids, correct_rate=correct_rate, prompt_len=prompt_len,
    ).to(device)


def model_flops(model_cfg: dict, num_params: int, num_seqs: int, seq: int) -> float:
    return 6.0 * num_params * num_seqs * seq + 12.0 * model_cfg["num_layers"] * model_cfg["embed_dim"] * seq**2 * num_seqs


def measure(args, fused: bool) -> dict:
    gpu = args.device.startswith("cuda")
    model_cfg = GPU_MODEL if gpu else CPU_MODEL
    dtype = torch.bfloat16 if gpu else torch.float32
    if gpu:  # each variant's peak on its own: the previous variant's model and states are garbage by now
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    with training.set_default_dtype(dtype), torch.device(args.device):
        model = qwen2(**model_cfg)
    if args.activation_checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=gpu)
    loss_fn = get_loss("grpo")
    batch = random_batch(args.batch, args.prompt_len, args.response_len, model_cfg["vocab_size"], args.device)
    seq = args.prompt_len + args.response_len

    def step():
        logprobs, entropy = response_logprobs(model, batch, temperature=1.0, fused=fused, chunk_size=args.chunk_size, return_entropy=True)
        out = loss_fn(logprobs, batch.old_logprobs, batch.response_mask, batch.rewards, batch.group_ids, correct_rate=batch.correct_rate)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    try:
        for _ in range(args.warmup + args.steps):
            synchronize(args.device)
            start = time.perf_counter()
            step()
            synchronize(args.device)
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError as e:
        return {"fused": fused, "error": f"out of memory: {str(e).splitlines()[0][:160]}"}
    seconds = statistics.median(times[args.warmup:])
    tokens = args.batch * seq
    row = {"fused": fused, "seconds": seconds, "tokens_per_s": tokens / seconds, "params": num_params,
           "model_tflop_per_step": model_flops(model_cfg, num_params, args.batch, seq) / 1e12}
    if gpu:
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
        if peak:
            row["mfu"] = row["model_tflop_per_step"] / seconds / peak
            row["peak_tflops"] = peak
    return row


def markdown(sections: list[dict]) -> str:
    lines = ["# One update step: fused log-probs vs materialised logits", ""]
    for s in sections:
        env = s["env"]
        label = "GPU, Qwen2.5-1.5B shape" if s["gpu"] else "CPU, SCALED-DOWN model (not the 1.5B shape; no MFU)"
        lines += [
            f"## {label}: {env['device_name']}",
            "",
            f"Model {s['model']}, {s['dtype']}, {s['batch']} × ({s['prompt_len']} + {s['response_len']}) tokens, "
            f"activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}, chunk_size {s['chunk_size']}, "
            f"median of {s['steps']} steps after {s['warmup']} warm-up. Machine: {env['platform']}, {env['cpu_count']} CPUs; "
            f"Python {env['python']}, torch {env['torch']}{', CUDA ' + env['cuda'] if env.get('cuda') else ''}; {env['date']}.",
            f"Command: `{env['command']}`",
            "",
            "| log-probs | s / step | tokens/s | model TFLOP / step | MFU | peak GiB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in s["rows"]:
            name = "fused" if r["fused"] else "materialised"
            if "error" in r:
                lines.append(f"| {name} | {r['error']} | | | | |")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "–"
            peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "–"
            lines.append(f"| {name} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | {r['model_tflop_per_step']:.3g} | {mfu} | {peak} |")
        if not s["gpu"]:
            lines += ["", "CPU caveat: on a 2-core virtual machine the same step has varied up to 4x between runs when",
                      "other jobs shared it, so one run does not rank the two paths. benchmarks/results/logprob_memory.md",
                      "isolates the log-prob path, each variant in its own process."]
        lines.append("")
    if not any(s["gpu"] for s in sections):
        lines += [
            "## GPU (Qwen2.5-1.5B shape, 4 × 4096 tokens, bf16)",
            "",
            "Not run: no GPU was lent to the session that wrote this file. `python benchmarks/step_throughput.py",
            "--device cuda` runs unchanged on one when lent (target from issue 6: ≥ 40% MFU on an H100).",
            "",
        ]
    lines += [
        "MFU formula: model FLOPs per step = 6·P·tokens + 12·L·d·S²·B (PaLM appendix B, attention counted",
        "non-causal; P = all parameters, tied embedding once; activation-checkpoint recompute not counted),",
        "divided by step time and the device's dense bf16 peak (H100/H200 SXM 989.4 TFLOP/s).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--response-len", type=int)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch here (run without --device for the scaled-down CPU variant)")
    if not gpu:
        print("CPU: running the SCALED-DOWN variant (CPU_MODEL, short sequences); the 1.5B figure needs --device cuda", file=sys.stderr)
        torch.set_num_threads(args.threads)
    for key, gpu_default, cpu_default in (("batch", 4, 2), ("prompt_len", 512, 64), ("response_len", 3584, 448)):
        if getattr(args, key) is None:
            setattr(args, key, gpu_default if gpu else cpu_default)
    rows = [measure(args, fused) for fused in (True, False)]
    section = {"env": environment(args.device), "gpu": gpu, "model": GPU_MODEL if gpu else CPU_MODEL,
               "dtype": "bfloat16" if gpu else "float32", "batch": args.batch, "prompt_len": args.prompt_len,
               "response_len": args.response_len, "chunk_size": args.chunk_size, "steps": args.steps, "warmup": args.warmup,
               "activation_checkpointing": args.activation_checkpointing, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step_throughput.md").write_text(markdown([section]))
    print(markdown([section]))


if __name__ == "__main__":
    main()
