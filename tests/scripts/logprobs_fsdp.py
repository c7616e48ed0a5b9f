"""Log-probs and gradients of response_logprobs under FSDP2 on N ranks (gloo on CPU).

    torchrun --nproc_per_node N tests/scripts/logprobs_fsdp.py OUT.pt

For each model variant (tied / untied output, and the output layer as its own FSDP unit) and each
path (fused / materialised / packed), rank r takes rows r, r+N, ... of one fixed batch, backpropagates
world_size · Σ upstream·logprobs (FSDP averages gradients over ranks, so the sum over ranks is the
1-rank gradient), and rank 0 saves every row's log-probs and entropy and the full gradients.
"""

import sys
from functools import partial

import torch
import torch.distributed as dist
from torchtune import training
from torchtune.models.qwen2 import qwen2

from polopt.batch import Completion, PromptGroup, RolloutBatch
from polopt.policy import response_logprobs

# (tied, modules sharded as their own FSDP unit besides the layers, paths run); a path is "fused",
# "materialised" or "packed" (fused on polopt.packing's layout). The recipe's sharding is the
# first two. torchtune's own TiedLinear cannot run when tok_embeddings is its own unit (it
# multiplies by the sharded DTensor): only the fused paths run there.
VARIANTS = {
    "tied": (True, None, ("fused", "materialised", "packed")),
    "untied": (False, None, ("fused", "materialised")),
    "untied_output_own_unit": (False, ["output"], ("fused", "materialised", "packed")),
    "tied_embeddings_own_unit": (True, ["tok_embeddings"], ("fused",)),
}


def fixed_batch() -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    groups = []
    for prompt_len in (3, 5, 2, 4):
        prompt = torch.randint(1, 64, (prompt_len,), generator=g).tolist()
        completions = [
            Completion(ids, [0.0] * len(ids), False)
            for ids in (torch.randint(1, 64, (n,), generator=g).tolist() for n in (4, 1, 6))
        ]
        groups.append(PromptGroup(prompt, "", completions, rewards=[1.0, 0.0, 0.0]))
    return RolloutBatch.collate(groups, pad_id=0)


def build(tied: bool) -> torch.nn.Module:
    """The tiny qwen2 every rank (and the unsharded reference) starts from."""
    torch.manual_seed(0)
    model = qwen2(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                  intermediate_dim=64, max_seq_len=128, tie_word_embeddings=tied)
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(0.3)
    return model


def upstream_grad(batch: RolloutBatch) -> torch.Tensor:
    """A ragged, row-dependent d(loss)/d(logprobs), zero on padding as every loss has it."""
    return torch.linspace(-1.0, 2.0, batch.response_mask.numel()).view_as(batch.response_mask) * batch.response_mask


def logprobs_and_backward(model, batch: RolloutBatch, rows: torch.Tensor, world: int, path: str):
    """This rank's rows: log-probs and entropy; gradients land in model's .grad."""
    model.zero_grad(set_to_none=True)
    logprobs, entropy = response_logprobs(model, batch.select(rows), temperature=0.8, fused=path != "materialised",
                                          pack=path == "packed", chunk_size=5, return_entropy=True)
    (world * (logprobs * upstream_grad(batch)[rows]).sum()).backward()
    return logprobs.detach(), entropy


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = fixed_batch()
    rows = torch.arange(rank, len(batch), world)
    results = {}
    for variant, (tied, own_unit, paths) in VARIANTS.items():
        model = build(tied)
        training.shard_model(model, [partial(training.get_shard_conditions, names_to_match=own_unit)],
                             cpu_offload=False, reshard_after_forward=True)
        for path in paths:
            logprobs, entropy = logprobs_and_backward(model, batch, rows, world, path)
            gathered = [None] * world
            dist.all_gather_object(gathered, (rows, logprobs, entropy))
            all_logprobs = torch.zeros(batch.response_mask.shape)
            all_entropy = torch.zeros(batch.response_mask.shape)
            for r, lp, ent in gathered:
                all_logprobs[r], all_entropy[r] = lp, ent
            grads = {n: full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
            results[(variant, path)] = {"logprobs": all_logprobs, "entropy": all_entropy, "grads": grads}
    if rank == 0:
        torch.save(results, out_path)
    from distributed_exit import finish  # here, not at the top: the tests import this file as a module

    finish()  # why not a plain destroy_process_group(): tests/scripts/distributed_exit.py


if __name__ == "__main__":
    main()
