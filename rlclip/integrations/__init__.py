"""Adapters that run rlclip's objectives inside other trainers.

``rlclip.integrations.trl`` (needs the ``trl`` package, see its supported
range there): ``ObjectiveGRPOTrainer``, a ``trl.GRPOTrainer`` whose policy
loss is an rlclip objective. Imported on demand, so ``rlclip`` itself never
imports TRL.
"""
