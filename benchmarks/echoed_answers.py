"""Echoed answers: how often the committed tiny models would be rewarded for restating the question.

    python benchmarks/echoed_answers.py                          # both tiny models, k=16 per val question
    python benchmarks/echoed_answers.py --models tiny_arith --k 16

The tiny tasks ask "Q: 591+734=? A:". math-verify scores an unevaluated expression as its value,
so "\\boxed{591+734}" (the question restated) scored 1 until `MathVerifier(number_answers="literal")`
became the default (docs/data.md). This script samples answers from each committed model in assets/
(the starting point of every tiny-task run, configs/tiny_arith*.yaml) the way validation does: the
val.jsonl questions as prompts (template "{question}"), the native rollout engine, temperature 1,
top_p 1, 48 new tokens, stopping at the stop token; truncated answers score 0, as in training. Each
answer is scored with MathVerifier in both modes; an answer is **echoed** when math-verify's
equivalence ("equivalent") rewards it and the default ("literal") does not. Also counted: final
answers that are not a number (`states_a_number` on the answer math-verify read), whatever their
reward. Writes benchmarks/results/echoed_answers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from _common import REPO, environment, write_results  # benchmarks/ is on sys.path when run as a script

MODELS = ("tiny_arith", "tiny_arith_hard")


def load(name: str):
    """(model, tokenizer) as the recipe loads them: torchtune Qwen2 through the HF checkpointer."""
    from torchtune.models.qwen2 import qwen2_tokenizer
    from torchtune.training import FullModelHFCheckpointer

    from polopt.models import tiny_arith

    path = REPO / "assets" / name
    tokenizer = qwen2_tokenizer(str(path / "vocab.json"), str(path / "merges.txt"),
                                special_tokens_path=str(path / "special_tokens.json"), max_seq_len=256)
    with tempfile.TemporaryDirectory() as out:
        checkpointer = FullModelHFCheckpointer(checkpoint_dir=str(path), checkpoint_files=["model.safetensors"],
                                               model_type="QWEN2", output_dir=out)
        model = tiny_arith()
        model.load_state_dict(checkpointer.load_checkpoint()["model"])
    return model.eval(), tokenizer


def measure(name: str, k: int, seed: int) -> dict:
    from functools import partial

    from polopt.prompts import PromptDataset, load_rows
    from polopt.rollout import NativeRolloutEngine, SamplingParams
    from polopt.verify import MathVerifier, answer_read, prediction_text, states_a_number

    model, tokenizer = load(name)
    prompts = list(PromptDataset(load_rows(str(REPO / "assets" / name / "val.jsonl")), tokenizer, template="{question}"))
    engine = NativeRolloutEngine(model, pad_id=tokenizer.pad_id, decode=partial(tokenizer.decode, skip_special_tokens=True))
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=48, stop_token_ids=list(tokenizer.stop_tokens), seed=seed)
    start = time.perf_counter()
    groups = engine.generate([p.token_ids for p in prompts], k, params)
    seconds = time.perf_counter() - start
    completions = [c for group in groups for c in group]
    texts, golds = [c.text for c in completions], [p.answer for p in prompts for _ in range(k)]
    with MathVerifier(num_workers=1) as literal, MathVerifier(num_workers=1, number_answers="equivalent") as equivalent:
        scores = {"literal": literal(texts, golds), "equivalent": equivalent(texts, golds)}
    for mode in scores:  # a truncated answer scores 0 in training and validation
        scores[mode] = [0.0 if c.truncated else s for c, s in zip(completions, scores[mode])]
    echoed = [i for i in range(len(texts)) if scores["equivalent"][i] > scores["literal"][i]]
    reads = []
    for text in texts:
        scored = prediction_text(text, "boxed", 4000)
        read = answer_read(scored) if scored is not None else None
        reads.append(read[1] if read else None)
    not_numbers = [i for i, read in enumerate(reads) if not states_a_number(read)]
    return {
        "model": f"assets/{name}", "questions": len(prompts), "k": k, "answers": len(texts),
        "truncated": sum(c.truncated for c in completions), "generate_seconds": seconds,
        "rewarded_equivalent": int(sum(scores["equivalent"])), "rewarded_literal": int(sum(scores["literal"])),
        "echoed": len(echoed),
        "echoed_examples": [{"question": prompts[i // k].text, "answer": texts[i]} for i in echoed[:10]],
        "not_a_number": len(not_numbers),
        "not_a_number_examples": [{"question": prompts[i // k].text, "answer": texts[i], "read": reads[i]}
                                  for i in not_numbers[:10]],
    }


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# Echoed answers (benchmarks/echoed_answers.py)", "",
        f"Command: `{env['command']}`  ",
        f"Machine: {env['platform']}, {env['cpus_usable']} usable CPUs, {env['torch_threads']} torch thread(s); "
        f"torch {env['torch']}; {env['date']}", "",
        f"Answers sampled from the committed tiny models ({result['k']} per validation question, temperature 1, "
        "48 new tokens, native engine), each scored by MathVerifier with `number_answers=\"equivalent\"` (math-verify's "
        "equivalence, what every committed run used) and with the default `\"literal\"`. **Echoed**: rewarded by "
        "equivalence only, i.e. the answer math-verify read is an expression such as `591+734`, not a number.", "",
        "| model | answers | truncated | rewarded (equivalent) | rewarded (literal) | echoed | final answer not a number |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(f"| {r['model']} | {r['answers']} | {r['truncated']} | {r['rewarded_equivalent']} | "
                     f"{r['rewarded_literal']} | {r['echoed']} | {r['not_a_number']} |")
    for r in result["runs"]:
        for kind in ("echoed", "not_a_number"):
            if r[f"{kind}_examples"]:
                lines += ["", f"{r['model']}, {kind.replace('_', ' ')} (first {len(r[f'{kind}_examples'])}):", ""]
                lines += [f"- `{e['question']}` → `{e['answer'].strip()}`" for e in r[f"{kind}_examples"]]
    echoed = sum(r["echoed"] for r in result["runs"])
    answers = sum(r["answers"] for r in result["runs"])
    lines += ["", "## What this means for the committed comparisons", ""]
    if echoed == 0:
        lines += [
            f"None of the {answers} sampled answers is rewarded only by echoing: the committed models answer "
            "with the chain of thought and a boxed integer, the form the task was trained in, and math-verify's "
            "equivalence and the number-literal default give every answer the same reward. Every tiny-task run "
            "starts from these models and RL can only reinforce answers it samples, so the committed comparisons "
            "(benchmarks/results/compare_losses*.md, nft_ablation.md) were not rewarded for echoes at their start, "
            "and their results stand. The trained policies are not committed, so their answers were not checked; "
            "an echo would have had to appear in sampling first (0 of "
            f"{min(r['answers'] for r in result['runs'])} answers of each model here: at the start, an echo rate below about "
            f"{3 / min(r['answers'] for r in result['runs']):.2%} per answer, the rule of three's 95% bound)."]
    else:
        lines += [
            f"{echoed} of {answers} sampled answers are rewarded only by echoing the question: the committed "
            "comparisons (benchmarks/results/compare_losses*.md) rewarded such answers and should be re-run with "
            "the number-literal default."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--k", type=int, default=16, help="answers per validation question")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="echoed_answers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = [measure(name, args.k, args.seed) for name in args.models]
    for r in runs:
        print(json.dumps({key: value for key, value in r.items() if not key.endswith("examples")}), flush=True)
    result = {"environment": environment("cpu"), "k": args.k, "seed": args.seed, "runs": runs}
    write_results(args.name, result, markdown(result))


if __name__ == "__main__":
    main()
