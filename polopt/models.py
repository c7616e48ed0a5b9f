"""Model builders named in the configs (`model._component_: polopt.models.<name>`).

`hf_model(model_dir)` builds the torchtune `TransformerDecoder` of any Hugging Face Llama-family or
Qwen2-family folder from its `config.json`, and `hf_checkpointer(checkpoint_dir, ...)` is the
matching `FullModelHFCheckpointer`, its model type and weight files read from the same folder; a
config then names the folder once (`model_dir`). The named builders below (the embedded tiny model,
Qwen2.5-Math-1.5B/7B) give the same shapes for their checkpoints and keep working.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from torchtune.models.llama3_2 import llama3_2
from torchtune.models.qwen2 import qwen2
from torchtune.modules import TransformerDecoder

from polopt.errors import ConfigError

# config.json `model_type` -> torchtune's checkpointer model type. Llama checkpoints go through
# torchtune's default conversion (q/k permuted for its interleaved RoPE); Qwen2's keeps HF's layout
# (its builder uses the rotate-half RoPE) and its qkv biases.
CHECKPOINTER_MODEL_TYPES = {"llama": "LLAMA3_2", "qwen2": "QWEN2"}


def read_hf_config(model_dir: Union[str, Path], key: str = "model_dir") -> dict[str, Any]:
    """The folder's config.json; a missing or unreadable one is a ConfigError naming `key`."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        what = "no such folder" if not Path(model_dir).is_dir() else "not an HF model folder (no config.json)"
        raise ConfigError(f"{key}={model_dir}: {what}; set {key} to an HF model folder", key) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); set {key} to an HF model folder", key) from None
    if config.get("model_type") not in CHECKPOINTER_MODEL_TYPES:
        raise ConfigError(
            f"{path}: model_type={config.get('model_type')!r} is not supported; polopt builds "
            f"{', '.join(CHECKPOINTER_MODEL_TYPES)} models from config.json (set model._component_ to a "
            "torchtune builder and checkpointer.model_type for others)", key,
        )
    return config


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope θ, scaling) from config.json, in transformers 4's (`rope_theta`, `rope_scaling`) or
    5's (`rope_parameters`) spelling; scaling is {} when there is none."""
    params = dict(config.get("rope_parameters") or {})
    theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
    scaling = dict(config.get("rope_scaling") or params)
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = {}
    return float(theta), scaling


def _refuse(path: Path, what: str) -> ConfigError:
    return ConfigError(f"{path}: {what}, which torchtune's builders do not implement; this model "
                       "cannot be trained by polopt as it is", "model_dir")


def hf_model(model_dir: str, max_seq_len: Optional[int] = None) -> TransformerDecoder:
    """The torchtune decoder of the HF folder `model_dir`, shaped from its config.json.

    Llama family (`model_type: llama`: Llama 2/3/3.1/3.2, SmolLM, ...) through torchtune's
    `llama3_2` builder (tied or untied embeddings, GQA, RoPE θ, Llama-3 RoPE scaling); Qwen2 family
    (`model_type: qwen2`: Qwen2, Qwen2.5, Qwen2.5-Math) through `qwen2` (qkv biases). What those
    builders cannot express (another RoPE scaling, biases where the builder has none, sliding-window
    attention, a head size other than hidden/heads) is refused with the reason. `max_seq_len`
    (default: `max_position_embeddings`) bounds prompt + answer; the KV cache is sized per batch.
    """
    path = Path(model_dir) / "config.json"
    config = read_hf_config(model_dir)
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    if config.get("head_dim", hidden // heads) != hidden // heads:
        raise _refuse(path, f"head_dim={config['head_dim']} differs from hidden_size/num_attention_heads={hidden // heads}")
    if config.get("hidden_act", "silu") != "silu":
        raise _refuse(path, f"hidden_act={config['hidden_act']!r} (not silu)")
    rope_theta, scaling = _rope(config)
    shape = dict(
        vocab_size=config["vocab_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        embed_dim=hidden,
        intermediate_dim=config["intermediate_size"],
        max_seq_len=max_seq_len or config.get("max_position_embeddings", 4096),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attn_dropout=0.0,
    )
    if config["model_type"] == "qwen2":
        if config.get("use_sliding_window"):
            raise _refuse(path, "use_sliding_window=true")
        if scaling:
            raise _refuse(path, f"RoPE scaling {scaling}")
        return qwen2(rope_base=rope_theta, **shape)
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise _refuse(path, "attention_bias/mlp_bias=true")
    if scaling:  # torchtune's Llama3ScaledRoPE has the Llama-3.1 constants built in
        rope_type = scaling.get("rope_type", scaling.get("type"))
        fixed = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
        if rope_type != "llama3" or any(float(scaling.get(k, -1)) != v for k, v in fixed.items()):
            raise _refuse(path, f"RoPE scaling {scaling} (only rope_type llama3 with {fixed} is built in)")
        scale_factor = scaling["factor"]
    else:
        scale_factor = 1  # no scaling: Llama3ScaledRoPE with factor 1 is plain RoPE
    return llama3_2(rope_base=rope_theta, scale_factor=scale_factor, **shape)


def hf_checkpointer(
    checkpoint_dir: str,
    output_dir: str,
    checkpoint_files: Optional[Union[list[str], dict]] = None,
    model_type: Optional[str] = None,
    **kwargs: Any,
):
    """torchtune's `FullModelHFCheckpointer` for the HF folder `checkpoint_dir`, its `model_type`
    derived from config.json (`CHECKPOINTER_MODEL_TYPES`) and its `checkpoint_files` from the
    folder (`model.safetensors`, or the shards a `model.safetensors.index.json` lists); either may
    still be given. Other arguments go to the checkpointer."""
    from torchtune.training import FullModelHFCheckpointer

    config = read_hf_config(checkpoint_dir, key="checkpointer.checkpoint_dir")
    folder = Path(checkpoint_dir)
    if checkpoint_files is None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            checkpoint_files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            checkpoint_files = ["model.safetensors"]
        else:
            present = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")) or "none"
            raise ConfigError(f"{folder}: no model.safetensors or model.safetensors.index.json (weight files there: "
                              f"{present}); set checkpointer.checkpoint_files", "checkpointer.checkpoint_files")
    return FullModelHFCheckpointer(
        checkpoint_dir=checkpoint_dir,
        checkpoint_files=checkpoint_files,
        model_type=model_type or CHECKPOINTER_MODEL_TYPES[config["model_type"]],
        output_dir=output_dir,
        **kwargs,
    )

def load_hf_folder(model_dir: str, max_seq_len: Optional[int] = None) -> TransformerDecoder:
    """`hf_model(model_dir)` with the folder's weights, in eval mode: the trainer's model outside the
    recipe (tests, benchmarks). The checkpointer's output folder is a scratch one, never written."""
    import tempfile

    model = hf_model(model_dir, max_seq_len=max_seq_len)
    with tempfile.TemporaryDirectory(prefix="polopt-checkpointer-") as scratch:
        model.load_state_dict(hf_checkpointer(model_dir, scratch).load_checkpoint()["model"])
    return model.eval()


# The embedded tiny model (assets/tiny_arith/config.json is written from these by
# scripts/make_tiny_arith.py, so the two cannot drift apart).
TINY_ARITH = dict(
    vocab_size=320,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=128,
    intermediate_dim=512,
    max_seq_len=256,
    norm_eps=1e-6,
    rope_base=10000.0,
    tie_word_embeddings=True,
)


def tiny_arith() -> TransformerDecoder:
    """The ~1 M-parameter Qwen2 trained from scratch on `polopt.tasks.arith` (assets/tiny_arith)."""
    return qwen2(attn_dropout=0.0, **TINY_ARITH)


# What the Qwen2.5-Math checkpoints share (their config.json: rope_theta 10000, 4096 positions,
# rms_norm_eps 1e-6); the sizes differ.
_QWEN2_5_MATH = dict(max_seq_len=4096, attn_dropout=0.0, norm_eps=1e-6, rope_base=10000.0)


def qwen2_5_math_1_5b() -> TransformerDecoder:
    """Qwen/Qwen2.5-Math-1.5B: its config.json has hidden 1536, intermediate 8960, 28 layers,
    12 heads, 2 KV heads, vocab 151936, tied embeddings, rope_theta 10000, 4096 positions."""
    return qwen2(vocab_size=151936, num_layers=28, num_heads=12, num_kv_heads=2, embed_dim=1536,
                 intermediate_dim=8960, tie_word_embeddings=True, **_QWEN2_5_MATH)


def qwen2_5_math_7b() -> TransformerDecoder:
    """Qwen/Qwen2.5-Math-7B: its config.json has hidden 3584, intermediate 18944, 28 layers,
    28 heads, 4 KV heads, vocab 152064, untied embeddings, rope_theta 10000, 4096 positions."""
    return qwen2(vocab_size=152064, num_layers=28, num_heads=28, num_kv_heads=4, embed_dim=3584,
                 intermediate_dim=18944, tie_word_embeddings=False, **_QWEN2_5_MATH)

