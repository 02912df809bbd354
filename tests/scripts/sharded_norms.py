"""Gradient clippers on FSDP2-style sharded (DTensor) gradients (run by ``two_process.py``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from rlclip.grad_clip import build_clipper

SCALES = (3.0, 2.0, 9.0)


def sharded_norms() -> dict:
    """For each clipper and three gradient scales: (measured norm, apply's metrics, norm after apply), and
    the norms of the full (unsharded) gradients."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    full = [torch.randn(6, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    out = {}
    for name, settings in [("norm", {}), ("zclip", {"warmup_steps": 1}), ("adagc", {"warmup_steps": 1}),
                           ("autoclip", {})]:
        clipper = build_clipper(name, **settings)
        params = [torch.nn.Parameter(distribute_tensor(torch.zeros_like(t), mesh, [Shard(0)])) for t in full]
        rows = []
        for scale in SCALES:
            for p, t in zip(params, full):
                p.grad = distribute_tensor(t * scale, mesh, [Shard(0)])
            norm = clipper.measure(params)
            metrics = clipper.apply(params, norm)
            post = torch.linalg.vector_norm(torch.cat([p.grad.full_tensor().flatten() for p in params]))
            rows.append([float(norm), metrics, float(post)])
        out[name] = rows
    out["full_norms"] = [float(torch.linalg.vector_norm(torch.cat([t.flatten() * s for t in full])))
                         for s in SCALES]
    return out
