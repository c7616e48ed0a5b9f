"""benchmarks/gpu_check.sh is run on a lent GPU machine, rarely: its CPU smoke mode runs the same
three benchmark scripts at toy sizes here, so that a change to any of them cannot leave the GPU
check broken until the next GPU session finds out. Its fourth section (vLLM TP=2 under torchrun)
needs 2 GPUs: here it must say that it was skipped, and its recipe command must be one the
recipe accepts."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke_measures_what_it_reports(tmp_path):
    """The smoke mode (toy sizes; each section has its own time limit in the script): every results
    file written, with numbers that hold whatever the machine's speed."""
    env = {**os.environ, "PYTHON": sys.executable, "POLOPT_BENCH_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("logprob_memory.md", "logprob_memory.json", "step_throughput.md",
                 "rollout_throughput.md", "rollout_throughput.json", "gpu_check.log"):
        assert (tmp_path / name).stat().st_size > 0, name
    # Log-prob path: both variants measured, each with a peak above its inputs and a time.
    (memory,) = json.loads((tmp_path / "logprob_memory.json").read_text())
    rows = {row["variant"]: row for row in memory["rows"]}
    assert set(rows) == {"materialised", "fused"} and (memory["tokens"], memory["vocab"]) == (256, 512)
    assert all(row["peak_bytes"] > 0 and row["seconds"] > 0 for row in rows.values())
    # Update step: fused and materialised log-probs do the same model FLOPs, each step takes time.
    table = [line.split("|")[1:-1] for line in (tmp_path / "step_throughput.md").read_text().splitlines()
             if line.startswith(("| fused |", "| materialised |"))]
    assert len(table) == 2 and all(float(cells[1]) > 0 for cells in table)
    assert table[0][3] == table[1][3] and float(table[0][3]) > 0
    # Rollout: every engine generated all 2 prompts × 2 samples × 4 tokens (no stop token), from a
    # torchtune model whose logits are transformers'.
    rollout = json.loads((tmp_path / "rollout_throughput.json").read_text())
    assert rollout["command"].startswith("python benchmarks/rollout_throughput.py")  # each file names its command
    assert {"native, shared prefill", "transformers generate"} <= set(rollout["results"])
    for engine, result in rollout["results"].items():
        assert result["generated_tokens"] == 2 * 2 * 4 and result["tokens_per_s"] > 0, engine
    assert rollout["max_logit_diff_torchtune_vs_hf"] < 1e-4
    log = (tmp_path / "gpu_check.log").read_text()
    assert "!!" not in log
    # The TP=2 section is there, and skipped with its reason.
    assert "== vllm_tp2\n-- skipped: --cpu-smoke: the TP=2 engine check needs 2 GPUs" in log
    # The committed results were not touched.
    assert not (REPO / "benchmarks" / "results" / "gpu_check").exists()


def test_gpu_check_script_parses_and_its_tp2_command_is_a_valid_recipe_config():
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")]).returncode == 0
    for section in ("logprob_memory", "step_throughput", "rollout_throughput", "vllm_tp2", "vllm_tp2_result"):
        assert f"run {section} " in script, section
    # Skipped unless 2 GPUs and vLLM are there, each with a printed reason.
    assert '"$gpus" -lt 2' in script and 'skip vllm_tp2 "needs >= 2 GPUs' in script
    assert 'skip vllm_tp2 "vLLM is not installed' in script
    # The recipe command of the TP=2 section: torchrun with 2 processes, TP 2, a valid config.
    command = re.search(r'run vllm_tp2 \d+ (.*?)\n  run vllm_tp2_result', script, re.S).group(1)
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[argv.index("--nproc_per_node") + 1] == "2"
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    assert "rollout.engine.tensor_parallel_size=2" in overrides

    from omegaconf import OmegaConf

    from polopt.config.validate import validate_config

    overrides = [o.replace("$tp2_out", "/tmp/polopt_tp2_check") for o in overrides]
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs" / f"{config}.yaml"), OmegaConf.from_dotlist(overrides))
    validate_config(cfg)
    assert cfg.max_steps == 2 and cfg.device == "cuda" and cfg.rollout.engine.tensor_parallel_size == 2
    world, tp = 2, cfg.rollout.engine.tensor_parallel_size
    assert world % tp == 0 and cfg.rollout.num_prompts % (world // tp) == 0  # one TP group, its prompts
