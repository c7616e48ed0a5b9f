"""`polopt.models.hf_model` / `hf_checkpointer` on config.json variants, and the tokenizer protocol
check: what is built (shapes, tie, biases, RoPE), what is refused and how the refusal reads.

Models are built on the meta device (no memory, no weights): the real-model agreement with
transformers is in tests/test_real_model.py (Llama) and, through configs/evaluate.yaml, the tiny
Qwen2 model in tests/test_evaluate.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import TiedLinear

from polopt.errors import ConfigError
from polopt.models import hf_checkpointer, hf_model, load_hf_folder
from polopt.tokenizer import HFTokenizer, check_tokenizer

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "assets" / "tiny_arith"

LLAMA = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
         "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu"}


def folder(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def build(tmp_path: Path, config: dict, **kwargs):
    with torch.device("meta"):
        return hf_model(str(folder(tmp_path, config)), **kwargs)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_llama_untied_with_gqa_and_llama3_rope_scaling(tmp_path):
    """Llama-3.1/3.2 style: untied head, GQA, rope_scaling llama3 with factor 8."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    model = build(tmp_path, {**LLAMA, "rope_scaling": scaling})
    attn = model.layers[0].attn
    assert isinstance(model.output, torch.nn.Linear) and model.output.weight.shape == (256, 64)
    assert attn.k_proj.weight.shape == (2 * 16, 64) and attn.q_proj.bias is None
    assert isinstance(attn.pos_embeddings, Llama3ScaledRoPE) and attn.pos_embeddings.scale_factor == 8.0
    assert attn.pos_embeddings.base == 500000.0 and model.max_seq_len == 512
    # embeddings + 2 × (q, k, v, o, 3 MLP, 2 norms) + final norm + untied head
    layer = 64 * 64 + 2 * (32 * 64) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert n_params(model) == 256 * 64 + 2 * layer + 64 + 256 * 64


def test_transformers_5_rope_parameters_and_tied_embeddings(tmp_path):
    config = {k: v for k, v in LLAMA.items() if k != "rope_theta"}
    model = build(tmp_path, {**config, "tie_word_embeddings": True,
                             "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}, max_seq_len=128)
    rope = model.layers[0].attn.pos_embeddings
    assert isinstance(model.output, TiedLinear) and rope.base == 100000.0 and rope.scale_factor == 1
    assert model.max_seq_len == 128


def test_qwen2_has_qkv_biases_and_rotate_half_rope(tmp_path):
    config = {**LLAMA, "model_type": "qwen2", "rope_theta": 10000.0, "tie_word_embeddings": True}
    attn = build(tmp_path, config).layers[0].attn
    assert attn.q_proj.bias is not None and attn.v_proj.bias is not None and attn.output_proj.bias is None
    assert isinstance(attn.pos_embeddings, Qwen2RotaryPositionalEmbeddings)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma2"}, "model_type='gemma2' is not supported; polopt builds llama, qwen2 models"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling {'rope_type': 'yarn', 'factor': 4.0}"),
    ({"attention_bias": True}, "attention_bias/mlp_bias=true"),
    ({"head_dim": 32}, "head_dim=32 differs from hidden_size/num_attention_heads=16"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' (not silu)"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window=true"),
])
def test_what_torchtune_cannot_build_is_refused_naming_the_file(tmp_path, change, message):
    with pytest.raises(ConfigError) as e:
        build(tmp_path, {**LLAMA, **change})
    assert message in str(e.value) and str(tmp_path / "config.json") in str(e.value)
    assert "\n" not in str(e.value)


def test_a_folder_without_config_json_names_model_dir(tmp_path):
    with pytest.raises(ConfigError, match=r"model_dir=.*not an HF model folder \(no config.json\)"):
        hf_model(str(tmp_path))
    with pytest.raises(ConfigError, match=r"model_dir=.*no such folder"):
        hf_model(str(tmp_path / "nope"))


def test_checkpointer_derives_model_type_and_files(tmp_path):
    checkpointer = hf_checkpointer(str(TINY), str(tmp_path))
    assert checkpointer._model_type.name == "QWEN2"
    assert [p.name for p in checkpointer._checkpoint_paths] == ["model.safetensors"]
    (tmp_path / "empty").mkdir()
    empty = folder(tmp_path / "empty", LLAMA)
    with pytest.raises(ConfigError, match="no model.safetensors or model.safetensors.index.json.*set checkpointer.checkpoint_files"):
        hf_checkpointer(str(empty), str(tmp_path))


def test_tiny_model_through_hf_model_equals_its_named_builder():
    """The generic builder reproduces the named one on the embedded Qwen2 model, weights included."""
    from polopt.models import tiny_arith

    generic, named = load_hf_folder(str(TINY)), tiny_arith()
    named.load_state_dict(generic.state_dict())
    tokens = torch.randint(0, 263, (2, 12))
    with torch.no_grad():
        assert torch.equal(generic(tokens), named(tokens))


def test_hf_tokenizer_gives_the_torchtune_tokenizers_ids_on_the_tiny_model():
    from torchtune.models.qwen2 import qwen2_tokenizer

    ours = HFTokenizer(str(TINY))
    theirs = qwen2_tokenizer(str(TINY / "vocab.json"), str(TINY / "merges.txt"),
                             special_tokens_path=str(TINY / "special_tokens.json"), max_seq_len=256)
    for text in ["Q: 591+734=? A:", " 1+4=5,9+3=12,\\boxed{1325}"]:
        assert ours.encode(text) == theirs.encode(text, add_bos=True, add_eos=False)
    # The model's own end token (generation_config.json); torchtune also stops on <|im_end|> (265),
    # which this model never learnt to write.
    assert ours.pad_id == theirs.pad_id == 263 and ours.stop_tokens == [263] and 263 in theirs.stop_tokens


class Incomplete:
    pad_id = 0

    def encode(self, text, add_bos=True, add_eos=False):
        return [1]

    def decode(self, ids, skip_special_tokens=True):
        return "x"


def test_tokenizer_check_names_what_is_missing_in_one_line():
    with pytest.raises(ConfigError, match=r"^tokenizer \(Incomplete\) lacks tokenize_messages, stop_tokens, which the "
                                          r"recipes use; set tokenizer._component_=polopt.tokenizer.HFTokenizer"):
        check_tokenizer(Incomplete())
    with pytest.raises(ConfigError, match=r"pad/stop ids \[263, 300\] are outside the model.s vocabulary \(256\)"):
        tokenizer = HFTokenizer(str(TINY))
        tokenizer.stop_tokens = [300]
        check_tokenizer(tokenizer, vocab_size=256)
