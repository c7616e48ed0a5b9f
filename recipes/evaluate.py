"""avg@k and pass@k of an HF-format model on math benchmarks, with the training data path.

    PYTHONPATH=. tune run recipes/evaluate.py --config configs/evaluate.yaml \
        model_dir=outputs/tiny_arith/final k=4 output_dir=outputs/eval \
        'datasets=[assets/tiny_arith/val.jsonl,../shared/data/math500.jsonl]'

Questions go through the same prompt templates, rollout engine and verifier as training
(`polopt.evaluation.evaluate_prompts`), so a validation curve during training and this recipe's
numbers are the same measurement. Writes `output_dir/eval.json` (per dataset: avg@k, pass@k, k,
number of questions, sampling settings) and `output_dir/eval.md` (a markdown table).

A dataset entry is a path (JSONL/Parquet) or hub name, or a mapping with `source` and any of
`template`, `question_field`, `answer_field`, `split`, `k`, `max_questions`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils
from torchtune.config._utils import _get_component_from_path

from polopt.evaluation import evaluate_prompts
from polopt.prompts import PromptDataset, load_rows
from polopt.rollout import SamplingParams

log = utils.get_logger("INFO")

_DATASET_KEYS = {"source", "template", "question_field", "answer_field", "split", "k", "max_questions", "name"}


def _dataset_entries(cfg: DictConfig) -> list[dict]:
    entries = []
    for i, item in enumerate(cfg.datasets):
        entry = {"source": item} if isinstance(item, str) else OmegaConf.to_container(item, resolve=True)
        unknown = set(entry) - _DATASET_KEYS
        if unknown or "source" not in entry:
            raise ValueError(
                f"datasets[{i}]: expected a path or a mapping with 'source' and any of "
                f"{sorted(_DATASET_KEYS - {'source'})}, got {entry}"
            )
        entries.append(entry)
    if not entries:
        raise ValueError("datasets is empty: give at least one dataset path")
    return entries


class EvaluateRecipe:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        if int(cfg.k) < 1:
            raise ValueError(f"k must be >= 1, got {cfg.k}")
        self.device = utils.get_device(device=cfg.get("device", "cpu"))
        self.dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=self.device)
        training.set_seed(cfg.get("seed", 0))

    def setup(self) -> None:
        cfg = self.cfg
        self.entries = _dataset_entries(cfg)
        self.tokenizer = config.instantiate(cfg.tokenizer)
        decode = partial(self.tokenizer.decode, skip_special_tokens=True)
        engine_cfg = cfg.rollout.engine
        if _get_component_from_path(engine_cfg._component_).shares_trainer_model:
            state = config.instantiate(cfg.checkpointer).load_checkpoint()[training.MODEL_KEY]
            with training.set_default_dtype(self.dtype), self.device:
                self.model = config.instantiate(cfg.model)
            self.model.load_state_dict(state)
            self.model.eval()
            self.engine = config.instantiate(engine_cfg, model=self.model, pad_id=self.tokenizer.pad_id, decode=decode)
        else:
            self.engine = config.instantiate(engine_cfg, decode=decode)
        self.verifier = config.instantiate(cfg.verifier)

    def evaluate(self) -> dict:
        cfg = self.cfg
        results = {}
        for entry in self.entries:
            name = entry.get("name") or Path(str(entry["source"])).stem
            rows = load_rows(
                entry["source"],
                split=entry.get("split", "test"),
                question_field=entry.get("question_field", "question"),
                answer_field=entry.get("answer_field", "answer"),
            )
            dataset = PromptDataset(
                rows,
                self.tokenizer,
                template=entry.get("template", cfg.template),
                max_prompt_tokens=cfg.get("max_prompt_tokens"),
                on_too_long="drop",
            )
            prompts = [dataset[i] for i in range(len(dataset))][: entry.get("max_questions", cfg.get("max_questions"))]
            k = int(entry.get("k", cfg.k))
            params = SamplingParams(
                temperature=float(cfg.temperature),
                top_p=float(cfg.top_p),
                top_k=cfg.get("top_k"),
                max_new_tokens=int(cfg.max_new_tokens),
                stop_token_ids=list(self.tokenizer.stop_tokens),
                seed=int(cfg.get("seed", 0)),
            )
            start = time.perf_counter()
            scores = evaluate_prompts(
                self.engine, self.verifier, prompts, k=k, params=params,
                batch_size=int(cfg.get("batch_size", 64)), progress=True, desc=name,
            )
            scores["seconds"] = round(time.perf_counter() - start, 2)
            results[name] = {
                **scores,
                "source": str(entry["source"]),
                "n_dropped_too_long": dataset.num_dropped,
                "sampling": asdict(params),
            }
            log.info(f"{name}: avg@{k} = {scores['avg_at_k']:.4f}, pass@{k} = {scores['pass_at_k']:.4f} "
                     f"({int(scores['n_questions'])} questions)")
        return results

    def write(self, results: dict) -> Path:
        out = Path(self.cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"model_dir": str(self.cfg.get("model_dir")), "datasets": results}
        (out / "eval.json").write_text(json.dumps(payload, indent=2))
        lines = ["| dataset | n | k | avg@k | pass@k |", "|---|---:|---:|---:|---:|"]
        for name, r in results.items():
            lines.append(f"| {name} | {int(r['n_questions'])} | {int(r['k'])} | {r['avg_at_k']:.4f} | {r['pass_at_k']:.4f} |")
        if len(results) > 1:
            mean = sum(r["avg_at_k"] for r in results.values()) / len(results)
            lines.append(f"| **mean** | | | {mean:.4f} | |")
        (out / "eval.md").write_text("\n".join(lines) + "\n")
        return out / "eval.json"

    def cleanup(self) -> None:
        if hasattr(self.verifier, "close"):
            self.verifier.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    try:
        recipe = EvaluateRecipe(cfg)
        recipe.setup()
        results = recipe.evaluate()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {recipe.write(results)}")
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
