"""Any rlclip objective as the policy loss of TRL's ``GRPOTrainer`` (contract 4).

TRL has no plug-in point for losses, so :class:`ObjectiveGRPOTrainer`
subclasses ``trl.GRPOTrainer`` and replaces only its loss: generation, vLLM,
rewards, advantages, logging, callbacks and checkpoints stay TRL's own. Per
micro-batch the adapter

- computes the current log-probs through TRL's own forward (its fused LM
  head, which also gives the entropy), or, for objectives that need a sparse
  support (TROLL), through ``rlclip.policy`` on the recorded old support;
- takes the old and reference log-probs TRL computed at generation time (the
  reference model is loaded whenever the objective needs it, with no TRL KL);
- maps TRL's ``loss_type`` to rlclip's aggregation with TRL's denominators,
  so the update equals TRL's for the same surrogate;
- logs the objective's metrics as ``objective/<name>`` in TRL's metrics.

Users with their own ``GRPOTrainer`` subclass call
:func:`rlclip_objective_loss` from their ``_compute_loss`` (and
:func:`record_old_support` after generation for TROLL).
"""

from rlclip.integrations.trl.config import (
    LOSS_TYPE_AGG,
    SUPPORTED_TRL,
    check_trl_args,
    check_trl_version,
    resolve_objective,
)
from rlclip.integrations.trl.loss import SUPPORT_PREFIX, record_old_support, rlclip_objective_loss
from rlclip.integrations.trl.trainer import ObjectiveGRPOTrainer

__all__ = ["LOSS_TYPE_AGG", "SUPPORTED_TRL", "SUPPORT_PREFIX", "ObjectiveGRPOTrainer", "check_trl_args",
           "check_trl_version", "record_old_support", "resolve_objective", "rlclip_objective_loss"]
