"""Load a 1-process training checkpoint into the tiny model sharded with FSDP2 over N ranks.

    torchrun --nproc_per_node N tests/scripts/reshard_checkpoint.py CHECKPOINT_DIR REFERENCE.pt OUT.json

The model is sharded as the recipe shards it; after `load_model_and_optimizer` the full model and
optimiser states are gathered and rank 0 writes their largest difference from REFERENCE.pt (the
1-process `state_dict()`s and parameter names).
"""

import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torchtune import training

from polopt.checkpoint import load_model_and_optimizer
from polopt.models import tiny_arith


def main() -> None:
    checkpoint, reference_path, out_path = sys.argv[1:]
    dist.init_process_group("gloo")
    with torch.device("meta"):
        model = tiny_arith()
    training.shard_model(
        model=model,
        shard_conditions=[partial(training.get_shard_conditions, names_to_match=None)],
        cpu_offload=False,
        reshard_after_forward=True,
    )
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "rope_init"):  # RoPE buffers are not in the state dict
            m.rope_init()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    load_model_and_optimizer(checkpoint, model, optimizer)
    # Loading must fill the model's parameters in place: an optimiser left holding replaced
    # parameter objects would step tensors the model no longer uses.
    model_params = {id(p) for p in model.parameters()}
    optimizer_holds_model_parameters = all(id(p) in model_params for g in optimizer.param_groups for p in g["params"])

    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    if dist.get_rank() == 0:
        reference = torch.load(reference_path, weights_only=True)
        diffs = [(model_state[k] - v).abs().max().item() for k, v in reference["model"].items()]
        # The 1-process optimiser state is keyed by parameter index, the gathered one by name.
        names = reference["param_names"]
        optim_diffs = [
            (optim_state["state"][names[pid]][key] - value).abs().max().item()
            for pid, moments in reference["optimizer"]["state"].items()
            for key, value in moments.items()
        ]
        lr = optim_state["param_groups"][0]["lr"]
        Path(out_path).write_text(json.dumps({
            "optimizer_holds_model_parameters": optimizer_holds_model_parameters,
            "compared_model": len(diffs),
            "compared_optimizer": len(optim_diffs),
            "max_abs_diff": max(diffs + optim_diffs + [abs(lr - reference["optimizer"]["param_groups"][0]["lr"])]),
        }))
    from distributed_exit import finish  # here, not at the top: the tests import this file as a module

    finish()  # why not a plain destroy_process_group(): tests/scripts/distributed_exit.py


if __name__ == "__main__":
    main()
