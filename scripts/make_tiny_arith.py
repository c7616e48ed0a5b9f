"""Make assets/tiny_arith: data, tokenizer and a tiny Qwen2 trained from scratch on noisy arithmetic.

    python scripts/make_tiny_arith.py                 # the committed assets (~5-8 min on 2 cores)
    python scripts/make_tiny_arith.py --quick --out /tmp/x   # seconds; for tests
    python scripts/make_tiny_arith.py --hard          # assets/tiny_arith_hard: noisier columns, q=0.63
                                                      # (= --q 0.63 --out assets/tiny_arith_hard)

Steps (all seeded, printed as they go):
1. problems: disjoint train/val/test splits of 3-digit additions -> {train,val,test}.jsonl
2. tokenizer: byte-level BPE with Qwen2's pre-tokenizer, trained on the corpus text, with the
   Qwen2 special tokens appended (so torchtune's qwen2_tokenizer and transformers give the same ids)
3. model: `polopt.models.tiny_arith` trained with AdamW on fresh noisy solutions
   (`polopt.tasks.arith.write_solution(q=...)`), loss on the response tokens and the stop token
4. HF export: config.json, model.safetensors (torchtune -> HF names), generation_config.json
5. base_eval.json: avg@16, the unbiased pass@1/4/16 (`polopt.evaluation.pass_at_k`) on val and
   test, temperature 1.0, `--max-new-tokens` per answer

Why noisy demonstrations: the base policy then solves a problem with probability about
(1 - q)^digits, every problem has a right answer within reach of sampling (pass@16 high), and
reinforcement learning with a verifier can raise pass@1 without a teacher. More digits (more noisy
columns) and a larger q make the questions harder for the base model. `--hard` aims at base
pass@1 <= 0.1 with pass@16 >= 0.5 (issue 16) with noisier columns of the same 3-digit task, so that
answers keep their length and a run its cost: the trained model is more accurate than its corpus,
so q sits above the 1 - 0.1^(1/3) that the corpus alone would need (base_eval.json has the numbers;
4-digit operands at q=0.45 and the default 600 steps gave a model far below its corpus).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torchtune.models.qwen2 import qwen2_tokenizer
from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf
from torchtune.models.qwen2._tokenizer import PRETOKENIZE_REGEX

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from polopt.evaluation import evaluate_prompts, pass_at_k  # noqa: E402
from polopt.models import TINY_ARITH, tiny_arith  # noqa: E402
from polopt.prompts import Prompt  # noqa: E402
from polopt.rollout import NativeRolloutEngine, SamplingParams  # noqa: E402
from polopt.tasks.arith import Problem, make_splits, sample_problem, write_solution  # noqa: E402
from polopt.verify import MathVerifier  # noqa: E402

# <|endoftext|> ends every answer: torchtune's Qwen2Tokenizer stops on it (its pad and a stop token).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
EOS = "<|endoftext|>"


def log(msg: str) -> None:
    print(f"[make_tiny_arith {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- 1. data
def write_jsonl(path: Path, problems: list[Problem]) -> None:
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps({"question": p.question, "answer": p.answer}) + "\n")


# ----------------------------------------------------------------------------- 2. tokenizer
def train_tokenizer(texts: list[str], out: Path) -> None:
    """Byte-level BPE as Qwen2's: NFC, Split on the Qwen2 regex, ByteLevel without its own regex."""
    bpe_vocab = TINY_ARITH["vocab_size"] - len(SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)  # appended after the BPE vocabulary, as in Qwen2
    # Fill the embedding table: every id the model can sample must decode (an untrained model
    # samples them all), so the ids the BPE did not use become reserved special tokens.
    reserved = TINY_ARITH["vocab_size"] - tok.get_vocab_size()
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(reserved)])
    if tok.get_vocab_size() != TINY_ARITH["vocab_size"]:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} ids, the model {TINY_ARITH['vocab_size']}")
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt, the files torchtune reads
    added = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    # The file torchtune's qwen2_tokenizer(special_tokens_path=...) parses: {"added_tokens": [{content, id}]}.
    (out / "special_tokens.json").write_text(
        json.dumps({"added_tokens": [{"content": t["content"], "id": t["id"]} for t in added]}, indent=1)
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "bos_token": None,
                "eos_token": EOS,
                "pad_token": EOS,
                "unk_token": None,
                "model_max_length": TINY_ARITH["max_seq_len"],
                "add_prefix_space": False,
                "clean_up_tokenization_spaces": False,
                "errors": "replace",
                "split_special_tokens": False,
            },
            indent=1,
        )
    )


def load_tokenizer(out: Path):
    return qwen2_tokenizer(
        str(out / "vocab.json"),
        str(out / "merges.txt"),
        special_tokens_path=str(out / "special_tokens.json"),
        max_seq_len=TINY_ARITH["max_seq_len"],
    )


# ----------------------------------------------------------------------------- 3. model
def make_batch(tokenizer, rng: random.Random, excluded: set[Problem], batch_size: int, digits: int, q: float):
    """Fresh noisy examples: ids [B, S] and a loss mask on the response + stop token."""
    rows = []
    while len(rows) < batch_size:
        p = sample_problem(rng, digits)
        if p in excluded:
            continue
        prompt = tokenizer.encode(p.question, add_bos=False, add_eos=False)
        response = tokenizer.encode(write_solution(p, rng, q).text, add_bos=False, add_eos=False)
        rows.append((prompt, response + [tokenizer.pad_id]))
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((batch_size, width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((batch_size, width), dtype=torch.bool)
    for i, (a, b) in enumerate(rows):
        ids[i, : len(a) + len(b)] = torch.tensor(a + b)
        mask[i, len(a) : len(a) + len(b)] = True
    return ids, mask


def init_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """N(0, 0.02) weights as HF's Qwen2 initializer: torch's default N(0, 1) embedding, tied to the
    output, starts with logits of std ~10 and a loss near 100."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)


def pretrain(model, tokenizer, args, excluded: set[Problem]) -> None:
    rng = random.Random(args.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0, running = time.perf_counter(), None
    for step in range(args.steps):
        ids, mask = make_batch(tokenizer, rng, excluded, args.batch_size, args.digits, args.q)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % max(1, args.steps // 20) == 0 or step == args.steps - 1:
            log(f"step {step + 1}/{args.steps} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"({time.perf_counter() - t0:.0f}s)")
    model.eval()


# ----------------------------------------------------------------------------- 4. HF export
def export_hf(model, tokenizer, out: Path) -> None:
    cfg = TINY_ARITH
    state = qwen2_tune_to_hf(
        {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
        num_heads=cfg["num_heads"],
        num_kv_heads=cfg["num_kv_heads"],
        dim=cfg["embed_dim"],
        tie_word_embeddings=cfg["tie_word_embeddings"],
    )
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    eos = tokenizer.special_tokens[EOS]
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["embed_dim"],
        "intermediate_size": cfg["intermediate_dim"],
        "num_hidden_layers": cfg["num_layers"],
        "num_attention_heads": cfg["num_heads"],
        "num_key_value_heads": cfg["num_kv_heads"],
        "max_position_embeddings": cfg["max_seq_len"],
        "max_window_layers": cfg["num_layers"],
        "rms_norm_eps": cfg["norm_eps"],
        "rope_theta": cfg["rope_base"],
        "tie_word_embeddings": cfg["tie_word_embeddings"],
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_sliding_window": False,
        "sliding_window": None,
        "use_cache": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, "do_sample": True,
                    "temperature": 1.0, "max_new_tokens": 64}, indent=1)
    )


# ----------------------------------------------------------------------------- 5. evaluation
def evaluate(model, tokenizer, problems: list[Problem], k: int, max_new_tokens: int, seed: int,
             verifier: MathVerifier) -> dict:
    """avg@k and pass@k at temperature 1.0 through the recipe's own rollout engine and scoring."""
    engine = NativeRolloutEngine(model, tokenizer.pad_id, partial(tokenizer.decode, skip_special_tokens=True))
    prompts = [Prompt(text=p.question, token_ids=tokenizer.encode(p.question, add_bos=False, add_eos=False), answer=p.answer)
               for p in problems]
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens,
                            stop_token_ids=list(tokenizer.stop_tokens), seed=seed)
    result = evaluate_prompts(engine, verifier, prompts, k=k, params=params, batch_size=max(1, 512 // k))
    for j in sorted({1, 4, 16, k}):
        if j <= k:
            result[f"pass@{j}"] = pass_at_k(result["correct_per_question"], k, j)
    return {**result, "example": problems[0].question + engine.generate([prompts[0].token_ids], 1, params)[0][0].text}


# ----------------------------------------------------------------------------- main
def _display_path(path: Path) -> str:
    """Repo-relative when inside the repo, so committed reports do not hold this machine's paths."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "assets" / "tiny_arith")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and a few steps (tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--digits", type=int, default=3)
    ap.add_argument("--q", type=float, default=0.3, help="per-step error probability of the corpus")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--k", type=int, default=16, help="samples per question in base_eval.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="answer budget of the base evaluation")
    ap.add_argument("--hard", action="store_true",
                    help="the harder task: --q 0.63, into assets/tiny_arith_hard unless --out is given")
    args = ap.parse_args(argv)
    if args.hard:
        given = set(argv if argv is not None else sys.argv[1:])
        if "--digits" in given or "--q" in given:
            ap.error("--hard sets --digits 3 --q 0.63; give those options without --hard instead")
        args.digits, args.q = 3, 0.63
        if "--out" not in given:
            args.out = REPO / "assets" / "tiny_arith_hard"
    sizes = {"train": 4000, "val": 200, "test": 200}
    if args.quick:
        sizes = {"train": 40, "val": 8, "test": 8}
        args.steps, args.batch_size, args.k = 3, 8, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log(f"writing into {out} with {vars(args)}")

    splits = make_splits(args.seed, args.digits, sizes)
    for name, problems in splits.items():
        write_jsonl(out / f"{name}.jsonl", problems)
    log("data: " + ", ".join(f"{n} {len(p)}" for n, p in splits.items()))

    corpus_rng = random.Random(args.seed + 2)
    corpus = []
    for _ in range(2000 if not args.quick else 50):
        p = sample_problem(corpus_rng, args.digits)
        corpus += [p.question, write_solution(p, corpus_rng, args.q).text]
    train_tokenizer(corpus, out)
    tokenizer = load_tokenizer(out)
    log(f"tokenizer: {len(tokenizer.encoder)} BPE tokens + {len(tokenizer.special_tokens)} special; "
        f"example {tokenizer.encode(corpus[0] + corpus[1], add_bos=False, add_eos=False)}")

    model = tiny_arith()
    init_weights(model)
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    excluded = set(splits["val"]) | set(splits["test"])
    pretrain(model, tokenizer, args, excluded)
    export_hf(model, tokenizer, out)
    log("exported HF checkpoint")

    report = {"command": "python scripts/make_tiny_arith.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "args": {k: _display_path(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "temperature": 1.0, "max_new_tokens": args.max_new_tokens, "torch": torch.__version__,
              "device": "cpu (not run on GPU)"}
    with MathVerifier(timeout_s=5.0, num_workers=1) as verifier:
        for name in ("val", "test"):
            report[name] = evaluate(model, tokenizer, splits[name], args.k, args.max_new_tokens,
                                    args.seed + 3 + len(name), verifier)
            log(f"{name}: avg@{args.k} {report[name]['avg_at_k']:.3f} pass@{args.k} {report[name]['pass_at_k']:.3f} "
                f"e.g. {report[name]['example']!r}")
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "base_eval.json").write_text(json.dumps(report, indent=1))
    log(f"done in {report['wall_seconds']}s")
    return report


if __name__ == "__main__":
    main()
