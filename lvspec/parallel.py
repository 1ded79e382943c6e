"""Tensor parallelism: a target sharded over the ranks of a torch.distributed group.

    parallel.start(rank, world, port)                 # every rank: NCCL on GPUs, gloo on CPU
    target = loading.load(path, world, dtype)           # each rank reads only its shard
    engine = Engine(target, draft, cfg)                 # the draft whole on every rank
    rank 0: engine.generate(rows) / engine.stream(feed) ... engine.close()
    others: engine.follow()                             # decode whatever rank 0 decodes

Sharding is transformers' own tensor-parallel plan for these models (q/k/v and gate/up split by
output rows, o and down by input columns, summed across ranks after), loaded by `from_pretrained`
from the safetensors shards, with two overrides: the embeddings and the LM head stay whole on
every rank, so that a decoding forward needs no gather of logits (every rank computes the same
full distribution, and so the same verdicts). The prompt forward runs through the HF modules with
transformers' hooks; decoding forwards run in `decoder.TextDecoder` on the local shards, with one
all-reduce after attention and one after the MLP per layer.

Every rank runs the same `Engine` on the same rows. What the host decides from measurements
(attention path, draft-step costs for k=auto) is decided on rank 0 and shared; rows are read on
rank 0 and shared; the draft's tokens and the prompt embeddings are broadcast from rank 0, so the
ranks' decisions cannot drift apart even where kernels are not bitwise reproducible.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Overrides of the models' own tensor-parallel plans: embeddings and LM head replicated.
PLAN = {"lm_head": "replicate", "model.language_model.embed_tokens": "replicate"}


@dataclass
class TensorParallel:
    """The ranks one target is sharded over: `group` carries tensors (NCCL or gloo), `control`
    carries Python objects (gloo)."""

    group: dist.ProcessGroup
    control: dist.ProcessGroup
    rank: int
    world: int

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def _src(self, group) -> int:
        return dist.get_global_rank(group, 0)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over the ranks, in place."""
        dist.all_reduce(t, group=self.group)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[world, *t.shape]: every rank's `t`, in rank order."""
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        return torch.stack(parts)

    def broadcast(self, t: torch.Tensor) -> None:
        """Rank 0's values of `t` on every rank (in place; a non-contiguous view is copied through)."""
        buf = t if t.is_contiguous() else t.contiguous()
        dist.broadcast(buf, src=self._src(self.group), group=self.group)
        if buf is not t:
            t.copy_(buf)

    def share(self, obj=None):
        """Rank 0's `obj` on every rank (others pass nothing)."""
        box = [obj if self.leader else None]
        dist.broadcast_object_list(box, src=self._src(self.control), group=self.control)
        return box[0]


def of(model) -> TensorParallel | None:
    """The tensor-parallel group a model was loaded over (None: whole on this process)."""
    if hasattr(model, "_lvspec_tp"):
        return model._lvspec_tp
    tp = None
    if dist.is_available() and dist.is_initialized():
        from torch.distributed.tensor import DTensor

        weight = model.model.language_model.layers[0].self_attn.q_proj.weight
        if isinstance(weight, DTensor) and weight.device_mesh.size() > 1:
            mesh = weight.device_mesh
            group = mesh.get_group()
            control = group if dist.get_backend(group) == "gloo" else dist.new_group(
                dist.get_process_group_ranks(group), backend="gloo")
            tp = TensorParallel(group, control, mesh.get_local_rank(), mesh.size())
    model._lvspec_tp = tp
    return tp


def check_shardable(text_config, world: int, key: str = "tensor_parallel") -> None:
    """Fail unless `world` ranks can split the model's attention heads, KV heads and MLP evenly."""
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"{key} must be an integer >= 1, got {world!r}")
    sizes = {"attention heads": text_config.num_attention_heads, "KV heads": text_config.num_key_value_heads,
             "MLP width": text_config.intermediate_size}
    bad = [f"{name} ({n})" for name, n in sizes.items() if n % world]
    if bad:
        raise ValueError(f"{key}={world} does not divide the target's {', '.join(bad)}")


def start(rank: int, world: int, port: int, cuda: bool | None = None, timeout_s: float = 1800.0) -> None:
    """Join this process to a `world`-rank group rendezvousing on 127.0.0.1:`port` (rank 0 hosts
    it): NCCL with one GPU per rank (cuda:`rank`) when `cuda`, else gloo."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    os.environ["LOCAL_RANK"] = str(rank)  # where transformers places this rank's shard
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


