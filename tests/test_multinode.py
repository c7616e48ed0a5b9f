"""Two torchrun "nodes" on this machine (two launches, `--nnodes 2 --nproc_per_node 1`, c10d
rendezvous on loopback): with one shared output_dir a killed run resumes to the metrics of an
uninterrupted one; with a folder per node the run is refused at once (polopt/run_dir.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from polopt.run_dir import SHARED_CHECK_PREFIX, claim_output_dir
from test_recipe import REPO, kill_process_tree, tune_command
from test_recipe_distributed import RESUME, step_metrics

NODE = ["num_threads=1", "max_steps=4", *RESUME]
SHARED_FOLDER_ERROR = "output_dir must be a folder every node sees (a shared filesystem)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_nodes(output_dirs: tuple[Path, Path], *overrides: str, logs: Path) -> list[tuple[subprocess.Popen, Path]]:
    """Start both launches of one 2-node run (node i writes to output_dirs[i]); returns each
    process with the file that receives its stdout and stderr."""
    rendezvous = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                  "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", "--rdzv_id", uuid.uuid4().hex[:12]]
    logs.mkdir(parents=True, exist_ok=True)
    nodes = []
    for i, output_dir in enumerate(output_dirs):
        cmd, env = tune_command(output_dir, *overrides)
        assert cmd[1:3] == ["run", "recipes/online_rl_distributed.py"], cmd
        # What `tune run <torchrun flags> recipes/online_rl_distributed.py ...` runs, without
        # importing torchtune's CLI in each launcher (seconds of a shared CPU per launch).
        cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous, "-m", "recipes.online_rl_distributed", *cmd[3:]]
        log = logs / f"node{i}_{time.monotonic_ns()}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**env, "OMP_NUM_THREADS": "1"})
        nodes.append((proc, log))
    return nodes


def wait_all(nodes, timeout: float = 300) -> list[tuple[int, str]]:
    deadline = time.time() + timeout
    try:
        for proc, _ in nodes:
            proc.wait(timeout=max(1, deadline - time.time()))
    finally:
        kill_all(nodes)
    return [(proc.returncode, log.read_text()) for proc, log in nodes]


def kill_all(nodes) -> None:
    """SIGKILL both launches and their workers."""
    for proc, _ in nodes:
        kill_process_tree(proc)


def run_two_nodes(output_dir: Path, *overrides: str, logs: Path) -> None:
    results = wait_all(start_two_nodes((output_dir, output_dir), *overrides, logs=logs))
    for code, output in results:
        assert code == 0, output[-6000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_two_node_run_resumes_with_identical_metrics(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_two_nodes(full, *NODE, logs=tmp_path / "logs")

    # The same run, both launches killed (SIGKILL) once the step-2 checkpoint exists, then resumed.
    nodes = start_two_nodes((killed, killed), *NODE, logs=tmp_path / "logs")
    checkpoint = killed / "checkpoints" / "step_2"  # renamed into place once every rank has written
    deadline = time.time() + 300
    while not checkpoint.exists() and all(p.poll() is None for p, _ in nodes) and time.time() < deadline:
        time.sleep(0.2)
    kill_all(nodes)
    assert checkpoint.exists(), "no step-2 checkpoint was written:\n" + "\n".join(log.read_text()[-3000:] for _, log in nodes)
    time.sleep(2)  # what a surviving worker would write, it writes now
    assert not (killed / "history.json").exists(), "the run finished: it was not killed"
    assert not (killed / "checkpoints" / "step_4").exists(), "the run got to step 4 before it was killed"
    run_two_nodes(killed, *NODE, "resume=true", logs=tmp_path / "logs")

    assert sorted(p.name for p in (killed / "checkpoints" / "step_4").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not [p for out in (full, killed) for p in out.iterdir() if p.name.startswith(SHARED_CHECK_PREFIX)]
    expected, resumed = step_metrics(full), step_metrics(killed)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert all("loss" in m and "reward/mean" in m for m in expected.values())
    assert resumed == expected


@pytest.mark.distributed
def test_a_folder_per_node_is_refused_at_once_on_every_node(tmp_path):
    dirs = (tmp_path / "node_a", tmp_path / "node_b")
    start = time.monotonic()
    results = wait_all(start_two_nodes(dirs, *NODE, logs=tmp_path / "logs"), timeout=180)
    for code, output in results:
        assert code != 0, output[-3000:]
        # torchrun reports its worker's exit status; the worker printed one line and exited with 2.
        assert "exitcode  : 2" in output, output[-3000:]
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output[-3000:]
        assert SHARED_FOLDER_ERROR in errors[0] and "output_dir=" in errors[0], errors[0]
        assert "Traceback" not in output.split("failed (exitcode")[0], output[-3000:]  # the worker's own output
    assert time.monotonic() - start < 120
    # Refused before anything was written: no folder on either "node" (rank 0 made one for the check
    # and removed it), so no checkpoint or config half-written.
    assert not dirs[0].exists() and not dirs[1].exists()


def test_a_leftover_shared_folder_check_file_is_not_a_run(tmp_path):
    """A run killed during the check leaves rank 0's file: the folder still counts as empty."""
    (tmp_path / f"{SHARED_CHECK_PREFIX}0123abcd").write_text("0123abcd")
    cfg = OmegaConf.create({"resume": False, "overwrite": False, "resume_allow_changes": False})
    assert claim_output_dir(tmp_path, cfg) is True
