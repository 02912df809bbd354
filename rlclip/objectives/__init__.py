"""Objectives: the API (contract 1) and the shipped surrogates.

>>> from rlclip.objectives import build_objective
>>> obj = build_objective("ratio_clip", eps_low=0.2, eps_high=0.28)
"""

from rlclip.objectives import (  # noqa: F401  (registers the shipped objectives)
    archer,
    aspo,
    bapo,
    cispo,
    clip_cov,
    dcpo,
    dppo,
    dppo_kimi,
    dro,
    gmpo,
    gpg,
    kl_cov,
    luspo,
    pspo,
    ratio_clip,
    reinforce_is,
    sapo,
    spo,
    topr,
    troll,
    vespo,
)
from rlclip.objectives.base import (
    AGG_MODES,
    KL_ESTIMATORS,
    Objective,
    aggregate,
    available_objectives,
    build_objective,
    kl_estimate,
    masked_mean,
    register_objective,
)
from rlclip.types import ObjectiveOutput, PolicyBatch

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "Objective",
    "ObjectiveOutput",
    "PolicyBatch",
    "aggregate",
    "available_objectives",
    "build_objective",
    "kl_estimate",
    "masked_mean",
    "register_objective",
]
