"""Forward+backward time of every registered loss against a plain masked mean of the same log-probs.

    python benchmarks/loss_overhead.py                       # [B, T] = [256, 1024], fp32, 1 thread
    python benchmarks/loss_overhead.py --threads 2 --repeats 20 --device cuda

Inputs: log-probs [B, T] with grad, old log-probs = log-probs + 0.1·N(0, 1), ragged response lengths
uniform in [T/4, T], groups of 16 answers with random 0/1 rewards. Each timed call is the whole
contract: input checks, loss, metrics (one device sync), and backward to the log-probs. The baseline
is `(logprobs * mask).sum() / mask.sum()` forward+backward. Median of `--repeats` after 3 warm-ups.

Writes benchmarks/results/loss_overhead.md and .json (machine, versions, date, command). A figure,
not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json

import torch
from _common import RESULTS, environment, time_call  # benchmarks/ is on sys.path when run as a script

from polopt.losses import get_loss, list_losses


def make_inputs(batch: int, length: int, group_size: int, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logprobs = -3 * torch.rand(batch, length, generator=generator)
    old_logprobs = logprobs + 0.1 * torch.randn(batch, length, generator=generator)
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=generator)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    rewards = torch.randint(0, 2, (batch,), generator=generator).float()
    group_ids = torch.arange(batch) // group_size
    return [t.to(device) for t in (logprobs, old_logprobs, mask, rewards, group_ids)]


def measure(args) -> dict:
    logprobs, old_logprobs, mask, rewards, group_ids = make_inputs(args.batch, args.length, args.group_size, args.device)
    leaf = logprobs.clone().requires_grad_(True)

    def masked_mean():
        leaf.grad = None
        ((leaf * mask).sum() / mask.sum()).backward()

    rows = [{"loss": "masked mean (baseline)", **time_call(masked_mean, args.device, args.repeats)}]
    for name in list_losses():
        loss_fn = get_loss(name)

        def step():
            leaf.grad = None
            loss_fn(leaf, old_logprobs, mask, rewards, group_ids).loss.backward()

        rows.append({"loss": name, **time_call(step, args.device, args.repeats)})
    baseline = rows[0]["seconds"]
    for row in rows:
        row["relative"] = row["seconds"] / baseline
    return {
        **environment(args.device),
        "shape": [args.batch, args.length],
        "group_size": args.group_size,
        "dtype": "float32",
        "repeats": args.repeats,
        "rows": rows,
    }


def markdown(runs: list[dict]) -> str:
    lines = ["# Loss overhead: forward+backward vs a masked mean", ""]
    for run in runs:
        lines += [
            f"## {run['device']} ({run['device_name']})",
            "",
            f"[B, T] = {run['shape']}, {run['dtype']}, groups of {run['group_size']}, median of {run['repeats']}. "
            f"Machine: {run['platform']}, {run['cpu_count']} CPUs, torch threads {run['torch_threads']}; "
            f"Python {run['python']}, torch {run['torch']}; {run['date']}.",
            f"Command: `{run['command']}`",
            "",
            "| loss | ms (median) | ms (fastest) | median × masked mean |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r['loss']} | {1000 * r['seconds']:.1f} | {1000 * r['min_seconds']:.1f} | {r['relative']:.1f} |"
            for r in run["rows"]
        ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machines)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    run = measure(args)
    print(markdown([run]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "loss_overhead.json"
    runs = json.loads(json_path.read_text()) if json_path.exists() else []
    runs = [r for r in runs if r["device"] != run["device"]] + [run]  # one run per device
    json_path.write_text(json.dumps(runs, indent=1) + "\n")
    (RESULTS / "loss_overhead.md").write_text(markdown(runs))
    print(f"wrote {json_path} and loss_overhead.md")


if __name__ == "__main__":
    main()
