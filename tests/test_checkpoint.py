"""Training-state checkpoints (polopt/checkpoint/): DCP round trip, atomic folders, pruning, and
refusal of anything on resume that is not tensors or plain data."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from polopt.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_model_and_optimizer,
    load_training_state,
    rng_state,
    save_training_state,
    set_rng_state,
)
from polopt.models import TINY_ARITH, tiny_arith

REPO = Path(__file__).resolve().parent.parent
RESHARD_SCRIPT = REPO / "tests" / "scripts" / "reshard_checkpoint.py"


def trained_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The embedded tiny model after two AdamW steps, so the optimiser has moments to save."""
    torch.manual_seed(seed)
    model = tiny_arith()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(2):
        tokens = torch.randint(0, TINY_ARITH["vocab_size"], (2, 12))
        model(tokens).float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    return trained_model(seed=0)


def fresh_model(seed: int = 123) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = tiny_arith()
    return model, torch.optim.AdamW(model.parameters(), lr=0.5)


class RunsCode:
    """A pickle whose loading would create `marker`: what an attacker would plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def save(out: Path, step: int, model, optimizer, **kwargs) -> Path:
    trainer_state = {"history": [{"step": 1, "loss": float("nan")}], "nan_steps": 1}
    return save_training_state(out, step, model, optimizer, trainer_state, {"position": step}, **kwargs)


def test_round_trip_restores_model_optimizer_and_plain_state(tmp_path, trained):
    model, optimizer = trained
    path = save(tmp_path, 7, model, optimizer)
    assert path == tmp_path / "checkpoints" / "step_7"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"

    restored, restored_optimizer = fresh_model()
    trainer_state, rank_state = load_training_state(path, restored, restored_optimizer)
    assert trainer_state["step"] == 7 and trainer_state["world_size"] == 1 and trainer_state["nan_steps"] == 1
    assert np.isnan(trainer_state["history"][0]["loss"])
    assert rank_state == {"position": 7}
    for (name, want), got in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(want, got), name
    want, got = optimizer.state_dict(), restored_optimizer.state_dict()
    assert got["param_groups"][0]["lr"] == 1e-3
    assert want["state"].keys() == got["state"].keys()
    for pid, moments in want["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, got["state"][pid][key]), (pid, key)


def test_rng_state_round_trips_through_json():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_keep_last_prunes_oldest_and_ignores_partial_folders(tmp_path, trained):
    model, optimizer = trained
    for step in (2, 4, 6):
        save(tmp_path, step, model, optimizer, keep_last=2)
    (tmp_path / "checkpoints" / ".step_8.partial").mkdir()  # a run killed while writing step 8
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_4", "step_6"]
    assert latest_checkpoint(tmp_path).name == "step_6"
    assert latest_checkpoint(tmp_path / "elsewhere") is None


def test_existing_checkpoint_is_never_overwritten(tmp_path, trained):
    model, optimizer = trained
    path = save(tmp_path, 3, model, optimizer)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    other, other_optimizer = trained_model(seed=1)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save(tmp_path, 3, other, other_optimizer)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_checkpoint_of_another_rank_count_is_refused(tmp_path, trained):
    model, optimizer = trained
    path = save(tmp_path, 3, model, optimizer)
    state_file = path / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "world_size": 2}))
    with pytest.raises(CheckpointError, match=r"written by 2 rank\(s\) and this run has 1.*--nproc_per_node 2"):
        load_training_state(path, *fresh_model())


def test_old_single_file_checkpoints_are_refused_not_unpickled(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    marker = tmp_path / "ran"
    torch.save({"model": RunsCode(marker)}, folder / "step_2.pt")
    with pytest.raises(CheckpointError, match="old single-file checkpoints"):
        latest_checkpoint(tmp_path)
    assert not marker.exists()


def test_planted_metadata_pickle_is_refused_and_never_run(tmp_path, trained):
    model, optimizer = trained
    path = save(tmp_path, 3, model, optimizer)
    marker = tmp_path / "ran"
    (path / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata is a pickle that is not tensors or plain data.*system"):
        load_training_state(path, *fresh_model())
    assert not marker.exists()


def test_planted_item_pickle_is_refused_and_never_run(tmp_path, trained):
    """A well-formed DCP checkpoint whose optimiser hyperparameter is a code-running object."""
    model, optimizer = trained
    marker = tmp_path / "ran"
    model_state, optim_state = get_state_dict(model, optimizer)
    optim_state["param_groups"][0]["lr"] = RunsCode(marker)
    path = tmp_path / "planted"
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f"{path}: its item 'optimizer.param_groups.0.lr'") + ".*system"):
        load_model_and_optimizer(path, *fresh_model())
    assert not marker.exists()
    # The same object is loaded (and runs) by plain torch.load: the refusal above is what protects.
    buffer = io.BytesIO()
    torch.save(RunsCode(marker), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=False)
    assert marker.exists()


@pytest.mark.distributed
def test_one_process_checkpoint_reshards_onto_two_fsdp_ranks(tmp_path, trained):
    """DCP reshards model and optimiser: a 1-process checkpoint loads into 2 FSDP2 ranks exactly."""
    model, optimizer = trained
    path = save(tmp_path, 2, model, optimizer)
    reference = tmp_path / "reference.pt"
    torch.save({
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "param_names": [name for name, _ in model.named_parameters()],
    }, reference)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(RESHARD_SCRIPT), str(path), str(reference), str(tmp_path / "diff.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    diff = json.loads((tmp_path / "diff.json").read_text())
    assert diff["compared_model"] == len(model.state_dict()) and diff["compared_optimizer"] > 0
    assert diff["max_abs_diff"] == 0.0
    assert diff["optimizer_holds_model_parameters"]
