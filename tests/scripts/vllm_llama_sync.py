"""Child process of tests/test_vllm_engine.py (one vllm.LLM per process): a vLLM engine on a real
Llama-architecture model (SmolLM2-135M-Instruct, tied embeddings) beside the trainer's torchtune
model built by `polopt.models.hf_model`. Sample chat prompts, compare the engine's log-probs with the
trainer's; change the tied embedding alone, then every weight (state dicts), then every weight again
(a stream of pairs), sync each time in 32 MiB buckets; print as JSON the largest |engine − trainer|
gap before any sync, against the new and against the old weights, and the buckets per sync."""

import json
import sys
from pathlib import Path

import torch

from polopt.models import load_hf_folder
from polopt.prompts import PromptDataset, load_rows
from polopt.rollout import VLLMRolloutEngine
from polopt.tokenizer import HFTokenizer
from tests.test_vllm_engine import count_buckets, max_diff, params_for, sample_and_recompute, sync_gaps

REPO = Path(__file__).resolve().parents[2]


def main(model_dir: Path) -> None:
    torch.manual_seed(0)
    tokenizer = HFTokenizer(str(model_dir))
    rows = load_rows(str(REPO / "assets" / "data" / "addition_chat_val.jsonl"))[:4]
    dataset = PromptDataset(rows, tokenizer, template="chat")
    prompts = [dataset[i].token_ids for i in range(len(dataset))]
    trainer, old = (load_hf_folder(str(model_dir), max_seq_len=256) for _ in range(2))
    # 32 MiB buckets: the 113 MB embedding alone, about two 14 MB decoder layers per bucket
    engine = VLLMRolloutEngine(str(model_dir), seed=0, dtype="float32", enforce_eager=True, max_model_len=256,
                               kv_cache_memory_bytes=64 << 20, sync_bucket_bytes=32 << 20)
    buckets = count_buckets(engine)
    params = params_for(tokenizer, max_new_tokens=16)
    batch, logprobs = sample_and_recompute(engine, trainer, tokenizer, prompts, params, num_samples=2)
    gaps = {"max_diff_base": max_diff(batch, logprobs), "num_tokens": int(batch.num_tokens),
            **sync_gaps(engine, trainer, old, tokenizer, prompts, params,
                        [{"tok_embeddings.weight"}, set(trainer.state_dict())], scale=0.01, num_samples=2)}
    streamed_gaps = sync_gaps(engine, trainer, old, tokenizer, prompts, params, [set(trainer.state_dict())],
                              scale=0.01, num_samples=2, stream=True)
    gaps["max_diff_new"] = max(gaps["max_diff_new"], streamed_gaps["max_diff_new"])
    gaps["max_diff_old"] = min(gaps["max_diff_old"], streamed_gaps["max_diff_old"])
    gaps["buckets_per_sync"] = len(buckets) // 3
    print(json.dumps(gaps))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
