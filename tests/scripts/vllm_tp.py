"""Launched by tests/test_vllm_engine.py with `python -m torch.distributed.run --standalone
--nproc_per_node=N` (N = 2 or 4): one vLLM engine per tensor-parallel group of 2 ranks on the
trainer's gloo process group, beside the trainer's torchtune model on every rank.

Each rank: init gloo, load the tiny model (the trainer's), build `VLLMRolloutEngine(...,
tensor_parallel_size=2, seed=100 + group)`; its group samples its own prompts with its own request
seed; compare the engine's log-probs with the trainer's; change every weight (the same on all
ranks), sync them as a stream in small buckets, sample and compare again (against the new and the
old weights); all_reduce on the default group after the engine is built and after the syncs.
Before that, a seed that differs within a group and a TP size that does not divide the world are
refused on every rank. Rank 0 prints one JSON line with every rank's figures; then every rank
closes its engine, and rank 0 prints whether the default process group survived that.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from polopt.prompts import PromptDataset, load_rows  # noqa: E402
from polopt.rollout import VLLMRolloutEngine  # noqa: E402
from tests.test_vllm_engine import (  # noqa: E402
    ASSET, ENGINE_KWARGS, load_trainer_model, max_diff, params_for, perturbed, sample_and_recompute, streamed,
    count_buckets,
)

TP = 2


def digest(batch) -> str:
    """The sampled tokens, as a short hash (ranks of a TP group must have the same)."""
    return hashlib.sha1(str(batch.input_ids[:, batch.prompt_len:][batch.response_mask].tolist()).encode()).hexdigest()[:16]


def all_reduce_works() -> bool:
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item() == dist.get_world_size()


def main() -> None:
    from torchtune.models.qwen2 import qwen2_tokenizer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = rank // TP
    local_world_size = os.environ["LOCAL_WORLD_SIZE"]
    tokenizer = qwen2_tokenizer(
        path=str(ASSET / "vocab.json"), merges_file=str(ASSET / "merges.txt"),
        special_tokens_path=str(ASSET / "special_tokens.json"), max_seq_len=256,
    )
    dataset = PromptDataset(load_rows(str(ASSET / "val.jsonl")), tokenizer)
    prompts = [dataset[i].token_ids for i in range(4 * group, 4 * group + 4)]  # the group's own prompts
    trainer, old = load_trainer_model(ASSET), load_trainer_model(ASSET)
    refused = {}  # refused before vLLM is built, alike on every rank
    for label, kwargs in {"seed": dict(seed=rank, tensor_parallel_size=TP), "size": dict(tensor_parallel_size=3)}.items():
        try:
            VLLMRolloutEngine(str(ASSET), **kwargs, **ENGINE_KWARGS)
        except ValueError as e:
            refused[label] = str(e)
    engine = VLLMRolloutEngine(str(ASSET), seed=100 + group, tensor_parallel_size=TP,
                               sync_bucket_bytes=1 << 20, **ENGINE_KWARGS)
    result = {"rank": rank, "group": group, "refused": refused, "all_reduce_after_build": all_reduce_works(),
              "local_world_size_kept": os.environ.get("LOCAL_WORLD_SIZE") == local_world_size,
              "dist_ident": os.environ.get("VLLM_DIST_IDENT")}  # names vLLM's CPU shared memory
    # each rank holds its shard: half the vocabulary rows of the embedding, half of q/k/v
    model_shapes = engine.llm.collective_rpc(lambda worker: (
        worker.model_runner.get_model().model.embed_tokens.num_embeddings_per_partition,
        worker.model_runner.get_model().model.layers[0].self_attn.qkv_proj.output_size_per_partition))
    result["embedding_rows"], result["qkv_rows"] = model_shapes[0]
    params = params_for(tokenizer, seed=3 + group)
    batch, logprobs = sample_and_recompute(engine, trainer, tokenizer, prompts, params, num_samples=2)
    result["num_tokens"] = int(batch.num_tokens)
    result["max_diff_base"] = max_diff(batch, logprobs)
    result["tokens_base"] = digest(batch)

    state = {k: v.clone() for k, v in trainer.state_dict().items()}
    old.load_state_dict(state)
    trainer.load_state_dict(perturbed(state, set(state), seed=7))  # the same change on every rank
    buckets = count_buckets(engine)
    engine.sync_weights(streamed(trainer.state_dict()))
    result["buckets"] = len(buckets)
    batch, logprobs = sample_and_recompute(engine, trainer, tokenizer, prompts, params, num_samples=2)
    with torch.no_grad():
        from polopt.policy import response_logprobs

        old_logprobs = response_logprobs(old, batch)[0]
    result["max_diff_new"] = max_diff(batch, logprobs)
    result["max_diff_old"] = max_diff(batch, old_logprobs)
    result["tokens_new"] = digest(batch)
    result["all_reduce_after_sync"] = all_reduce_works()
    result["local_world_size_end"] = os.environ.get("LOCAL_WORLD_SIZE")

    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        print(json.dumps({"world_size": world, "ranks": results}), flush=True)
    dist.barrier()
    engine.close()  # vLLM's shutdown destroys the default process group: last
    if rank == 0:
        print(json.dumps({"process_group_after_close": dist.is_initialized()}), flush=True)


if __name__ == "__main__":
    main()
