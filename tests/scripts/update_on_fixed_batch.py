"""Run one `update_policy` of the online RL recipe on a fixed batch, on 1 or N ranks.

    torchrun --nproc_per_node N tests/scripts/update_on_fixed_batch.py BATCH.pt OUT.json [key=value ...]

Rank r takes the groups g with g % N == r, so that the k-th mini-batch of every rank together is
the k-th mini-batch of the 1-rank run; rank 0 writes the metrics.
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    batch_path, out_path, *overrides = sys.argv[1:]
    spec = importlib.util.spec_from_file_location("online_rl", REPO / "recipes" / "online_rl_distributed.py")
    recipe_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe_module)
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs" / "tiny_arith.yaml"), OmegaConf.from_dotlist(overrides))
    recipe = recipe_module.OnlineRLRecipe(cfg)
    recipe.setup()
    batch = torch.load(batch_path, weights_only=False)
    mine = (batch.group_ids % recipe.world_size) == recipe.rank
    metrics = recipe._reduce_metrics(recipe.update_policy(batch.select(mine.nonzero().flatten())))
    if recipe.rank == 0:
        Path(out_path).write_text(json.dumps(metrics))
    recipe.cleanup()


if __name__ == "__main__":
    main()
