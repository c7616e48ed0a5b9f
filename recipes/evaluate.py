"""avg@k and pass@k of an HF-format model on math benchmarks, with the training data path.

    polopt evaluate --config evaluate model_dir=outputs/tiny_arith_nft/final output_dir=outputs/eval_nft \
        'datasets=[assets/tiny_arith/val.jsonl,assets/data/math500.jsonl]' k=16 'pass_k=[1,4,16]'
    # = PYTHONPATH=. tune run recipes/evaluate.py --config configs/evaluate.yaml ...

`model_dir` is any HF model folder: the embedded base model (default), or the `final/` a training
run wrote. Questions go through the same prompt templates, rollout engine and verifier as training
(`polopt.evaluation.evaluate_prompts`), so a validation curve during training and this recipe's
numbers are the same measurement. `k` answers are sampled per question; `pass_k` lists the j <= k
for which the unbiased pass@j (Chen et al. 2021, `polopt.evaluation.pass_at_k`) is computed from
the per-question correct counts (unset, `pass_k: null`: 1, 4, 16, ... up to k; a j above k that
the config asks for is refused). Writes `output_dir/eval.json` (per dataset: avg@k, pass@k = solved
at least once in k, "pass@j" for each j in pass_k, each question's correct count, number of
questions, sampling settings) and `output_dir/eval.md` (a markdown table); an existing eval.json
is replaced only with `overwrite=true`.

A dataset entry is a path (JSONL/Parquet) or hub name, or a mapping with `source` and any of
`name`, `template`, `question_field`, `answer_field`, `split`, `k`, `max_questions`. Every key is
checked (`polopt.config.validate.validate_eval_config`): a typo is an error, not a default.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils

from polopt.checkpoint import load_hf_model
from polopt.errors import UserError
from polopt.evaluation import evaluate_prompts, pass_at_k
from polopt.prompts import PromptDataset, load_rows
from polopt.recipe_config import (
    ConfigError,
    describe_user_error,
    instantiate_component,
    pass_k_for,
    sampling_params,
    validate_eval_config,
)
from polopt.rollout_worker import build_engine, engine_takes_model
from polopt.runtime import set_cpu_threads
from polopt.tokenizer import check_tokenizer

log = utils.get_logger("INFO")


class EvaluateRecipe:
    def __init__(self, cfg: DictConfig) -> None:
        OmegaConf.set_struct(cfg, False)
        self.cfg = cfg = validate_eval_config(cfg)
        out = Path(cfg.output_dir)
        if (out / "eval.json").exists() and not cfg.overwrite:
            raise ConfigError(f"output_dir={out} already holds an eval.json; set overwrite=true to replace it, "
                              "or another output_dir", "output_dir")
        self.device = utils.get_device(device=cfg.device)
        self.dtype = training.get_dtype(cfg.dtype, device=self.device)
        self.num_threads = set_cpu_threads(cfg.num_threads, self.device)
        training.set_seed(cfg.seed)

    def setup(self) -> None:
        cfg = self.cfg
        native = engine_takes_model(cfg.rollout.engine)
        if native:  # first: a wrong model_dir shows up as a missing tokenizer file otherwise
            _, state = load_hf_model(cfg.checkpointer)
        self.tokenizer = instantiate_component(cfg.tokenizer, "tokenizer")
        if native:
            with training.set_default_dtype(self.dtype), self.device:
                self.model = instantiate_component(cfg.model, "model")
            check_tokenizer(self.tokenizer, vocab_size=self.model.tok_embeddings.num_embeddings)
            self.model.load_state_dict(state)
            self.model.eval()
            self.engine = build_engine(cfg.rollout.engine, self.tokenizer, self.model)
            max_seq_len = self.model.max_seq_len
        else:
            check_tokenizer(self.tokenizer)
            self.engine = build_engine(cfg.rollout.engine, self.tokenizer)
            max_seq_len = getattr(self.tokenizer, "max_seq_len", None)
        # Every dataset is read (and its prompts checked) before the first one is evaluated.
        self.datasets = [self._setup_dataset(i, entry, max_seq_len) for i, entry in enumerate(cfg.datasets)]
        self.verifier = instantiate_component(cfg.verifier, "verifier")

    def _setup_dataset(self, i: int, entry: DictConfig, max_seq_len) -> tuple[str, DictConfig, PromptDataset]:
        cfg = self.cfg
        section = f"datasets[{i}]"
        rows = load_rows(entry.source, split=entry.split, question_field=entry.question_field,
                         answer_field=entry.answer_field, config_section=section)
        dataset = PromptDataset(
            rows,
            self.tokenizer,
            template=entry.template or cfg.template,
            max_prompt_tokens=cfg.max_prompt_tokens,
            on_too_long="drop",
            config_section=section if entry.template else "",
        )
        if max_seq_len:
            dataset.check_fits(cfg.max_new_tokens, max_seq_len, max_new_tokens_key="max_new_tokens")
        return entry.name or Path(str(entry.source)).stem, entry, dataset

    def evaluate(self) -> dict:
        cfg = self.cfg
        results = {}
        self.answers: dict[str, list[dict]] = {}
        for name, entry, dataset in self.datasets:
            prompts = [dataset[j] for j in range(len(dataset))][: entry.max_questions or cfg.max_questions]
            k = int(entry.k or cfg.k)
            params = sampling_params(
                "",
                temperature=float(cfg.temperature),
                top_p=float(cfg.top_p),
                top_k=cfg.top_k,
                max_new_tokens=int(cfg.max_new_tokens),
                stop_token_ids=list(self.tokenizer.stop_tokens),
                seed=int(cfg.seed),
            )
            start = time.perf_counter()
            scores = evaluate_prompts(
                self.engine, self.verifier, prompts, k=k, params=params,
                batch_size=int(cfg.batch_size), progress=True, desc=name, keep_answers=cfg.save_answers,
            )
            if cfg.save_answers:
                self.answers[name] = scores.pop("answers")
            scores["seconds"] = round(time.perf_counter() - start, 2)
            pass_k = pass_k_for(cfg.pass_k, k)
            for j in pass_k:
                scores[f"pass@{j}"] = pass_at_k(scores["correct_per_question"], k, j)
            results[name] = {
                **scores,
                "source": str(entry.source),
                "n_dropped_too_long": dataset.num_dropped,
                "sampling": asdict(params),
            }
            unbiased = "".join(f", pass@{j} = {scores[f'pass@{j}']:.4f}" for j in pass_k if j != k)  # pass@k: solved in k
            log.info(f"{name}: avg@{k} = {scores['avg_at_k']:.4f}, pass@{k} = {scores['pass_at_k']:.4f}{unbiased} "
                     f"({int(scores['n_questions'])} questions)")
        return results

    def write(self, results: dict) -> Path:
        out = Path(self.cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"model_dir": str(self.cfg.get("model_dir")), "datasets": results}
        (out / "eval.json").write_text(json.dumps(payload, indent=2))
        for name, answers in self.answers.items():
            with open(out / f"answers_{name}.jsonl", "w") as f:
                f.writelines(json.dumps(a) + "\n" for a in answers)
        extra = sorted({c for r in results.values() for c in r if c.startswith("pass@")}, key=lambda c: int(c[5:]))
        lines = ["| dataset | n | k | avg@k | pass@k (solved in k) |" + "".join(f" {c} |" for c in extra),
                 "|---|---:|---:|---:|---:|" + "---:|" * len(extra)]
        for name, r in results.items():
            lines.append(f"| {name} | {int(r['n_questions'])} | {int(r['k'])} | {r['avg_at_k']:.4f} | {r['pass_at_k']:.4f} |"
                         + "".join(f" {r[c]:.4f} |" if c in r else " – |" for c in extra))
        if len(results) > 1:
            mean = sum(r["avg_at_k"] for r in results.values()) / len(results)
            lines.append(f"| **mean** | | | {mean:.4f} | |" + " |" * len(extra))
        (out / "eval.md").write_text("\n".join(lines) + "\n")
        return out / "eval.json"

    def cleanup(self) -> None:
        if hasattr(self.verifier, "close"):
            self.verifier.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """User errors (`UserError`: config, data, paths) print one line and exit 2; bugs keep their traceback."""
    recipe = None
    try:
        recipe = EvaluateRecipe(cfg)
        recipe.setup()
        results = recipe.evaluate()
    except (UserError, FileNotFoundError) as e:
        if recipe is not None and hasattr(recipe, "verifier"):
            recipe.cleanup()
        print(describe_user_error(e, sys.argv), file=sys.stderr)
        sys.exit(2)
    print(f"wrote {recipe.write(results)}")
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
