"""Run one `update_policy` of the online RL recipe on a fixed batch, on 1 or N ranks.

    torchrun --nproc_per_node N tests/scripts/update_on_fixed_batch.py BATCH.pt OUT.json [key=value ...]

Rank r holds the groups g with g % N == r (as a prompt stream shards), so the global batch is the
1-rank run's batch in the same order; rank 0 writes the metrics, the optimiser step count and the
norm of every weight's change.
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from polopt.batch import Completion, PromptGroup, RolloutBatch

REPO = Path(__file__).resolve().parents[2]


def prompt_groups(batch: RolloutBatch) -> list[PromptGroup]:
    """The batch's rows as the sampler's groups (the old log-probs as the engine's)."""
    groups = []
    for gid in batch.group_ids.unique(sorted=True).tolist():
        rows = (batch.group_ids == gid).nonzero().flatten().tolist()
        prompt = batch.input_ids[rows[0], : batch.prompt_len][batch.attention_mask[rows[0], : batch.prompt_len]]
        completions = []
        for i in rows:
            n = int(batch.response_mask[i].sum())
            tokens = batch.input_ids[i, batch.prompt_len : batch.prompt_len + n]
            completions.append(Completion(tokens.tolist(), batch.old_logprobs[i, :n].tolist(), truncated=False))
        groups.append(PromptGroup(prompt.tolist(), "", completions, batch.rewards[rows].tolist()))
    return groups


def main() -> None:
    batch_path, out_path, *overrides = sys.argv[1:]
    spec = importlib.util.spec_from_file_location("online_rl", REPO / "recipes" / "online_rl_distributed.py")
    recipe_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe_module)
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs" / "tiny_arith.yaml"), OmegaConf.from_dotlist(overrides))
    recipe = recipe_module.OnlineRLRecipe(cfg)
    recipe.setup()
    groups = prompt_groups(torch.load(batch_path, weights_only=False))
    before = {name: w.clone() for name, w in recipe._full_state_dict().items()}
    minibatches = recipe.minibatches(groups[recipe.rank :: recipe.world_size])
    metrics = recipe._reduce_metrics(recipe.update_policy(minibatches))
    metrics["optimizer_steps"] = len(minibatches)
    weights = recipe._full_state_dict()
    if recipe.rank == 0:
        metrics["update_norms"] = {name: (w.double() - before[name].double()).norm().item() for name, w in weights.items()}
        Path(out_path).write_text(json.dumps(metrics))
    recipe.cleanup()


if __name__ == "__main__":
    main()
