"""Every GPU config can start (issue 24, item 5).

The GPU configs (Qwen2.5-Math-1.5B, Qwen2.5-Math-7B in the paper's and the authors' setting,
Qwen2.5-32B) cannot run here: no GPU, no checkpoints. What can go wrong before their first step is
checked anyway, through the same `instantiate_component` calls the recipe makes:

- `model`: built at full size on the meta device through the config's own `model` section; its
  parameter count must be the published one: Qwen/Qwen2.5-Math-1.5B 1,543,714,304 (tied
  embeddings), Qwen/Qwen2.5-Math-7B 7,615,616,512 and Qwen/Qwen2.5-32B 32,763,876,352 (untied).
  These are the sums the shapes of each checkpoint's config.json on the Hugging Face hub give
  (`PUBLISHED_CONFIG_JSON`: hidden, intermediate, layers, heads, KV heads, vocabulary, tying, as
  also written in polopt.models' docstrings and torchtune's `qwen2_5_32b_base`); the model built
  from that config.json by `polopt.models.hf_model` is compared with the config's builder name by
  name and shape. (Qwen2.5-32B's model card rounds to "32.5B"; the shapes sum to 32.76B.)
- `tokenizer`: `qwen2_5_tokenizer` needs only a vocab.json and a merges.txt to be built; the real
  Qwen files are not here, so the config's `model_dir` points at a stand-in folder laid out like
  the `tune download` folder whose vocab.json/merges.txt are the Qwen2-style BPE files of
  assets/tiny_arith. Only that path changes; every other argument is the config's.
- `checkpointer`: instantiated on the stand-in folder (its config.json is the published one; its
  weight files are empty placeholders with the config's file names, which torchtune only checks
  exist until it loads them).
- `dataset`, and the validation set as the recipe builds it: the config's own sources, cut to
  their first rows in a temporary file (same fields, same template), then `check_fits` against the
  model's max_seq_len as the recipe does.
- `verifier`, `rollout_correction`, `optimizer` (over one tiny parameter), `lr_scheduler`,
  `metric_logger` (into tmp_path).
- `rollout.engine`: vLLM cannot load a 1.5B-32B model here, so its class is resolved and its
  constructor's signature bound to the config's arguments plus what the recipe passes; a key that
  falls into `VLLMRolloutEngine(**llm_kwargs)` must be an argument of `vllm.LLM` / `EngineArgs`.
- The launch line in each config's header (`--nnodes N --nproc_per_node M`) fits the config:
  world size divisible by `rollout.engine.tensor_parallel_size`, a TP group within one node, and
  `rollout.num_prompts` divisible by the number of TP (data-parallel) groups.

`test_a_component_argument_that_does_not_exist_is_an_error` checks that the checks above fail on
a config naming an argument a component does not take.
"""

from __future__ import annotations

import gzip
import inspect
import itertools
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]

PUBLISHED_PARAMETERS = {
    "qwen2_5_math_1_5b.yaml": 1_543_714_304,
    "qwen2_5_math_7b.yaml": 7_615_616_512,
    "qwen2_5_math_7b_authors.yaml": 7_615_616_512,
    "qwen2_5_32b.yaml": 32_763_876_352,
}

_QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu", use_sliding_window=False,
              bos_token_id=151643, eos_token_id=151643, torch_dtype="bfloat16")
# The shape fields of each checkpoint's config.json on the Hugging Face hub.
PUBLISHED_CONFIG_JSON = {
    "Qwen2.5-Math-1.5B": dict(_QWEN2, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                              max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
                              tie_word_embeddings=True),
    "Qwen2.5-Math-7B": dict(_QWEN2, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                            max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
                            tie_word_embeddings=False),
    "Qwen2.5-32B": dict(_QWEN2, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                        max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-5,
                        tie_word_embeddings=False),
}
CHECKPOINT = {"qwen2_5_math_1_5b.yaml": "Qwen2.5-Math-1.5B", "qwen2_5_math_7b.yaml": "Qwen2.5-Math-7B",
              "qwen2_5_math_7b_authors.yaml": "Qwen2.5-Math-7B", "qwen2_5_32b.yaml": "Qwen2.5-32B"}


def _first_rows(source: str, path: Path, n: int = 8) -> str:
    """The first `n` rows of a JSONL(.gz) data file of the checkout, written to `path`."""
    opener = gzip.open if source.endswith(".gz") else open
    with opener(REPO / source, "rt") as f:
        path.write_text("".join(itertools.islice(f, n)))
    return str(path)


def _stand_in_model_dir(folder: Path, checkpoint: str, checkpoint_files) -> Path:
    """A folder laid out like `tune download Qwen/<checkpoint>`: the published config.json, the
    tiny Qwen2-style BPE files as vocab.json/merges.txt, empty weight files of the config's names."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(PUBLISHED_CONFIG_JSON[checkpoint]))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(REPO / "assets" / "tiny_arith" / name, folder / name)
    for name in checkpoint_files:
        (folder / name).touch()
    return folder


def load_with_stand_ins(name: str, tmp_path: Path, *overrides: str):
    """The config `configs/<name>` with only its paths moved: `model_dir` to a stand-in folder,
    `output_dir` into tmp_path, the data sources to their first rows."""
    cfg = OmegaConf.load(REPO / "configs" / name)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    files = OmegaConf.to_container(cfg.checkpointer, resolve=False).get("checkpoint_files") or []
    cfg.model_dir = str(_stand_in_model_dir(tmp_path / "model", CHECKPOINT[name], files))
    cfg.output_dir = str(tmp_path / "out")
    cfg.dataset.source = _first_rows(cfg.dataset.source, tmp_path / "train.jsonl")
    cfg.validation.source = _first_rows(cfg.validation.source, tmp_path / "val.jsonl")
    return cfg


def _check_engine_arguments(cfg, tokenizer) -> None:
    """`rollout.engine`: the class resolves, and its constructor takes the config's arguments with
    what the recipe adds (`_setup_rollout_engine`); extra keys go to `vllm.LLM`, so they must be its."""
    from torchtune.config._utils import _get_component_from_path

    section = OmegaConf.to_container(cfg.rollout.engine, resolve=True)
    engine_cls = _get_component_from_path(section.pop("_component_"))
    recipe_adds = {"decode": tokenizer.decode}
    if engine_cls.shares_trainer_model:
        recipe_adds.update(model=torch.nn.Module(), pad_id=tokenizer.pad_id)
    signature = inspect.signature(engine_cls)
    signature.bind(**section, **recipe_adds)  # TypeError: an argument the constructor lacks or misses
    named = {p.name for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    extra = set(section) - named
    if extra:
        import dataclasses

        vllm = pytest.importorskip("vllm", reason="the engine's extra keys are vllm.LLM's; vLLM is not installed")
        from vllm.engine.arg_utils import EngineArgs

        known = {f.name for f in dataclasses.fields(EngineArgs)} | set(inspect.signature(vllm.LLM).parameters)
        unknown = sorted(extra - known)
        if unknown:
            raise TypeError(f"rollout.engine: {unknown} are neither {engine_cls.__name__}'s arguments nor vllm.LLM's")


COMPONENTS = ("model", "tokenizer", "checkpointer", "optimizer", "lr_scheduler", "verifier", "rollout_correction",
              "dataset", "metric_logger")


def _check_named_arguments(cfg) -> None:
    """Each key of a component section is a named argument of its constructor. `validate_config`
    lets any key through to a constructor with `**kwargs`, and some ignore them (torchtune's
    `TensorBoardLogger(log_dir, organize_logs=True, **kwargs)` drops its kwargs): a misspelt key
    there would do nothing. (`rollout.engine`'s extra keys are vLLM's: `_check_engine_arguments`.)"""
    from torchtune.config._utils import _get_component_from_path

    for key in COMPONENTS:
        target = _get_component_from_path(cfg[key]._component_)
        named = {p.name for p in inspect.signature(target).parameters.values()
                 if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
        unknown = sorted(set(cfg[key]) - named - {"_component_"})
        if unknown:
            raise TypeError(f"{key} ({cfg[key]._component_}): {unknown} are not arguments of its constructor")


def start_components(cfg, tmp_path: Path) -> torch.nn.Module:
    """Every component of the config as the recipe builds it; the model on the meta device."""
    from polopt.recipe_config import instantiate_component, validate_config

    cfg = validate_config(cfg)
    _check_named_arguments(cfg)
    with torch.device("meta"):
        model = instantiate_component(cfg.model, "model")
    tokenizer = instantiate_component(cfg.tokenizer, "tokenizer")
    instantiate_component(cfg.checkpointer, "checkpointer", output_dir=str(tmp_path / "checkpointer_scratch"))
    stand_in = [torch.nn.Parameter(torch.zeros(4))]
    optimizer = instantiate_component(cfg.optimizer, "optimizer", stand_in)
    instantiate_component(cfg.lr_scheduler, "lr_scheduler", optimizer, num_training_steps=cfg.max_steps)
    verifier = instantiate_component(cfg.verifier, "verifier")
    verifier.close()
    instantiate_component(cfg.rollout_correction, "rollout_correction")
    _check_engine_arguments(cfg, tokenizer)
    build_datasets(cfg, tokenizer, model.max_seq_len)
    logger = instantiate_component(cfg.metric_logger, "metric_logger")
    logger.close()
    return model


def build_datasets(cfg, tokenizer, max_seq_len: int):
    """The training dataset and the validation set as the recipe builds them, each non-empty and
    checked against the model's context (tests/test_recipe.py builds the CPU configs' with it)."""
    from polopt.config.instantiate import instantiate_component
    from polopt.prompts import DEFAULT_TEMPLATE, prompt_dataset

    dataset = instantiate_component(cfg.dataset, "dataset", tokenizer)
    assert len(dataset) > 0
    dataset.check_fits(cfg.rollout.max_new_tokens, max_seq_len, max_new_tokens_key="rollout.max_new_tokens")
    v = cfg.validation
    validation = prompt_dataset(
        tokenizer, v.source, split=v.split, question_field=v.question_field, answer_field=v.answer_field,
        template=v.template or cfg.dataset.get("template", DEFAULT_TEMPLATE), max_prompt_tokens=v.max_prompt_tokens,
        on_too_long=v.on_too_long, config_section="validation",
    )
    assert len(validation) > 0
    validation.check_fits(v.max_new_tokens or cfg.rollout.max_new_tokens, max_seq_len,
                          max_new_tokens_key="validation.max_new_tokens")
    return dataset, validation


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_gpu_config_starts_with_the_published_model_size(name, tmp_path):
    from polopt.models import hf_model

    cfg = load_with_stand_ins(name, tmp_path)
    model = start_components(cfg, tmp_path)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]
    # The builder the config names has the shapes of the checkpoint's config.json.
    with torch.device("meta"):
        from_config_json = hf_model(cfg.model_dir)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in from_config_json.state_dict().items()}
    assert (tmp_path / "out" / "logs").is_dir()  # metric_logger.log_dir: ${output_dir}/logs


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_gpu_config_launch_line_fits_its_topology(name):
    """The `--nnodes N --nproc_per_node M` of the header: TP groups of consecutive ranks within a
    node, and the prompts of a rollout step shared evenly by the TP (data-parallel) groups."""
    text = (REPO / "configs" / name).read_text()
    launches = re.findall(r"--nnodes (\d+) --nproc_per_node (\d+)|--nproc_per_node (\d+)", text)
    assert launches, f"{name}: no launch line in the header"
    cfg = OmegaConf.load(REPO / "configs" / name)
    tp = cfg.rollout.engine.get("tensor_parallel_size", 1)
    for nnodes, per_node, single in launches:
        nnodes, per_node = (int(nnodes), int(per_node)) if not single else (1, int(single))
        world = nnodes * per_node
        assert per_node % tp == 0, f"{name}: a TP group of {tp} would span nodes of {per_node} GPUs"
        dp_groups = world // tp
        assert cfg.rollout.num_prompts % dp_groups == 0, (name, world, tp)
        if cfg.filter.get("gen_batch_size"):
            assert cfg.filter.gen_batch_size % dp_groups == 0, (name, world, tp)


@pytest.mark.parametrize("section", [*COMPONENTS, "rollout.engine"])
def test_a_component_argument_that_does_not_exist_is_an_error(section, tmp_path):
    from polopt.errors import ConfigError

    cfg = load_with_stand_ins("qwen2_5_math_1_5b.yaml", tmp_path, f"{section}.no_such_argument=1")
    with pytest.raises((ConfigError, TypeError), match="no_such_argument"):
        start_components(cfg, tmp_path)


def test_slurm_script_runs_one_polopt_per_node_at_one_rendezvous(tmp_path):
    """scripts/slurm_multinode.sh with stand-in `scontrol` and `srun` (no SLURM here): the command
    it runs is one `polopt train` per node, with torchrun's multi-node flags before --config."""
    import os
    import shlex
    import subprocess

    script = REPO / "scripts" / "slurm_multinode.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_GPUS_ON_NODE": "8", "SRUN_ARGS": str(tmp_path / "srun_args"), "POLOPT": "polopt"}
    proc = subprocess.run(["bash", str(script), "--config", "qwen2_5_math_7b", "loss=nft"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "srun_args").read_text().splitlines()
    assert argv[:6] == ["--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1", "polopt"]
    assert shlex.join(argv[6:]) == (
        "train --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint gpu-a:29500 --rdzv_id 4242 "
        "--config qwen2_5_math_7b loss=nft"
    )
    # Outside an allocation it says so instead of starting anything.
    env.pop("SLURM_JOB_NUM_NODES")
    proc = subprocess.run(["bash", str(script), "--config", "qwen2_5_math_7b"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0 and "SLURM_JOB_NUM_NODES is not set" in proc.stderr
