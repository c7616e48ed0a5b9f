"""response_logprobs under FSDP2 on 2 ranks (gloo) gives the log-probs and gradients of the plain
unsharded model on 1 process, fused, materialised and packed, tied and untied output weights.

The output weight is a sharded DTensor outside its module's forward; the fused path projects
inside that forward, so FSDP gathers it and reduce-scatters its gradient. A wrong gradient route
shows up here as a missing or different `output.weight` / `tok_embeddings.weight` gradient.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "logprobs_fsdp.py"

_spec = importlib.util.spec_from_file_location("logprobs_fsdp", SCRIPT)
fsdp_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fsdp_script)


def unsharded_reference(tied: bool, path: str) -> dict:
    """The same computation on one process without FSDP: all rows, world size 1, padded layout
    (so the packed path is checked against the plain one too)."""
    model = fsdp_script.build(tied)
    batch = fsdp_script.fixed_batch()
    plain = "fused" if path == "packed" else path
    logprobs, entropy = fsdp_script.logprobs_and_backward(model, batch, torch.arange(len(batch)), 1, plain)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"logprobs": logprobs, "entropy": entropy, "grads": grads}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp") / "two_ranks.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    return torch.load(out)


CASES = [(variant, path) for variant, (_, _, paths) in fsdp_script.VARIANTS.items() for path in paths]


@pytest.mark.distributed
@pytest.mark.parametrize("variant, path", CASES)
def test_two_ranks_match_unsharded_one_process(two_ranks, variant, path):
    tied = fsdp_script.VARIANTS[variant][0]
    sharded, ref = two_ranks[(variant, path)], unsharded_reference(tied, path)
    mask = fsdp_script.fixed_batch().response_mask
    torch.testing.assert_close(sharded["logprobs"][mask], ref["logprobs"][mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(sharded["entropy"][mask], ref["entropy"][mask], rtol=0, atol=1e-5)
    assert sharded["grads"].keys() == ref["grads"].keys()
    projection = "tok_embeddings.weight" if tied else "output.weight"
    assert ref["grads"][projection].abs().sum() > 0
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-4, atol=1e-5, msg=name)
