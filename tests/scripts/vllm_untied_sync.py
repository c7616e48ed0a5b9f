"""Child process of tests/test_vllm_engine.py (one vllm.LLM per process): a vLLM engine on an
untied copy of the tiny model; change lm_head alone, then every weight, sync each time, and print
as JSON the largest |engine − trainer| log-prob gap against the new and against the old weights."""

import json
import sys
from pathlib import Path

from torchtune.models.qwen2 import qwen2

from polopt.models import TINY_ARITH
from polopt.prompts import PromptDataset, load_rows
from polopt.rollout import VLLMRolloutEngine
from tests.test_vllm_engine import ASSET, ENGINE_KWARGS, load_trainer_model, params_for, sync_gaps


def untied_tiny_arith():
    return qwen2(attn_dropout=0.0, **{**TINY_ARITH, "tie_word_embeddings": False})


def main(model_dir: Path) -> None:
    from torchtune.models.qwen2 import qwen2_tokenizer

    tokenizer = qwen2_tokenizer(
        path=str(model_dir / "vocab.json"), merges_file=str(model_dir / "merges.txt"),
        special_tokens_path=str(model_dir / "special_tokens.json"), max_seq_len=256,
    )
    dataset = PromptDataset(load_rows(str(ASSET / "val.jsonl")), tokenizer)
    prompts = [dataset[i].token_ids for i in range(8)]
    trainer = load_trainer_model(model_dir, untied_tiny_arith)
    old = load_trainer_model(model_dir, untied_tiny_arith)
    engine = VLLMRolloutEngine(str(model_dir), seed=0, **ENGINE_KWARGS)
    gaps = sync_gaps(engine, trainer, old, tokenizer, prompts, params_for(tokenizer),
                     [{"output.weight"}, set(trainer.state_dict())])
    print(json.dumps(gaps))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
