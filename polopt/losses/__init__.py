"""polopt.losses: NFT, RFT, GRPO, Dr.GRPO, DAPO, InfoNCA behind one contract. Needs only torch.

    from polopt.losses import get_loss
    loss_fn = get_loss("nft", epsilon=1.0, prompt_weight="dr_grpo")
    out = loss_fn(logprobs, old_logprobs, mask, rewards, group_ids)   # + token_weights=, ...
    out.loss.backward(); out.metrics   # dict of floats

See base.py for the call contract (rollout correction `token_weights=` included), inputs.py for
its checks, aggregation.py for `loss_agg` and the normalizer.
"""

from polopt.losses.aggregation import LOSS_AGG_MODES, NORMALIZER_KINDS, global_normalizer
from polopt.losses.base import LossOutput, PolicyLoss, TokenLevelLoss
from polopt.losses.group_stats import group_correct_rate
from polopt.losses.inputs import LossInputs
from polopt.losses.ratios import RATIO_LEVELS
from polopt.losses.registry import get_loss, list_losses, loss_hparams, register_loss

# Importing the loss modules registers them.
from polopt.losses.nft import NFTLoss
from polopt.losses.rft import RFTLoss
from polopt.losses.grpo import GRPOLoss
from polopt.losses.dr_grpo import DrGRPOLoss
from polopt.losses.dapo import DAPOLoss
from polopt.losses.infonca import InfoNCALoss

# The losses polopt ships, in the paper's order (the registrations above are their one source;
# `list_losses()` also names losses a user registers later).
BUILTIN_LOSSES = tuple(list_losses(registration_order=True))
TOKEN_LEVEL_LOSSES = tuple(n for n in BUILTIN_LOSSES if issubclass(type(get_loss(n)), TokenLevelLoss))
GRPO_FAMILY = tuple(n for n in BUILTIN_LOSSES if issubclass(type(get_loss(n)), GRPOLoss))

__all__ = [
    "BUILTIN_LOSSES",
    "GRPO_FAMILY",
    "TOKEN_LEVEL_LOSSES",
    "LOSS_AGG_MODES",
    "NORMALIZER_KINDS",
    "RATIO_LEVELS",
    "LossInputs",
    "LossOutput",
    "DAPOLoss",
    "DrGRPOLoss",
    "GRPOLoss",
    "InfoNCALoss",
    "NFTLoss",
    "PolicyLoss",
    "RFTLoss",
    "TokenLevelLoss",
    "get_loss",
    "global_normalizer",
    "group_correct_rate",
    "list_losses",
    "loss_hparams",
    "register_loss",
]
