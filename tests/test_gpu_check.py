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


def test_gpu_check_cpu_smoke_writes_every_result(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "POLOPT_BENCH_RESULTS": str(tmp_path)}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("logprob_memory.md", "logprob_memory.json", "step_throughput.md",
                 "rollout_throughput.md", "rollout_throughput.json", "gpu_check.log"):
        assert (tmp_path / name).stat().st_size > 0, name
    # Each results file names the machine and the command that produced it.
    rollout = json.loads((tmp_path / "rollout_throughput.json").read_text())
    assert rollout["command"].startswith("python benchmarks/rollout_throughput.py")
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

    from polopt.recipe_config import validate_config

    overrides = [o.replace("$tp2_out", "/tmp/polopt_tp2_check") for o in overrides]
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs" / f"{config}.yaml"), OmegaConf.from_dotlist(overrides))
    validate_config(cfg)
    assert cfg.max_steps == 2 and cfg.device == "cuda" and cfg.rollout.engine.tensor_parallel_size == 2
    world, tp = 2, cfg.rollout.engine.tensor_parallel_size
    assert world % tp == 0 and cfg.rollout.num_prompts % (world // tp) == 0  # one TP group, its prompts
