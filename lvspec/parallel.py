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

Those all-reduces are small (rows x tokens x hidden values: KiB to a few MiB) and two a layer, so
their latency is what counts. With `LVSPEC_TP_ALLREDUCE=oneshot` (the same on every rank) they run
one-shot on a CUDA group (`TensorParallel.reduce`): one kernel on the decoding stream copies this
rank's part into a buffer that every rank can read over NVLink (torch symmetric memory, set up once
per group when the group is found, `of`), waits for the others, and sums all parts itself; it is
captured in the decoding graphs like any kernel. NCCL's all-reduce carries larger tensors, gloo
(CPU) groups, and everything by default (`nccl`) or when symmetric memory cannot be set up (said
once, on every rank). `oneshot` stays opt-in until a GPU sitting has measured it (BENCHMARKS,
`bench.tensor_parallel step --all-reduce nccl oneshot`). NVLink multicast is never used: it is
switched off (TORCH_SYMM_MEM_DISABLE_MULTICAST=1) before the buffer's rendezvous, and no multimem
op runs.

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
ALL_REDUCE_ENV = "LVSPEC_TP_ALLREDUCE"  # "nccl" (default) or "oneshot" (where it can run; not yet measured)
# The one-shot buffer: the largest decoding forward's partial sums fit (32 rows x 11 tokens x 8192
# wide in bf16 is 5.8 MB); larger tensors go through NCCL, whose bandwidth wins there.
ONE_SHOT_BYTES = 8 << 20
_BUFFERS: dict[str, torch.Tensor | None] = {}  # group name -> its one-shot buffer (None: NCCL only)


@dataclass
class TensorParallel:
    """The ranks one target is sharded over: `group` carries tensors (NCCL or gloo), `control`
    carries Python objects (gloo)."""

    group: dist.ProcessGroup
    control: dist.ProcessGroup
    rank: int
    world: int
    symm: torch.Tensor | None = None  # the group's one-shot buffer (symmetric memory); None: NCCL / gloo only

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def _src(self, group) -> int:
        return dist.get_global_rank(group, 0)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over the ranks: one-shot into a new tensor when `t` fits the group's buffer,
        else through the group's all-reduce, in place. Use the result."""
        if self._one_shot_fits(t):
            # The buffer's view as long as `t`: the kernel copies and sums exactly its length.
            part = self.symm[:t.numel() * t.element_size()].view(t.dtype)
            return torch.ops.symm_mem.one_shot_all_reduce_copy(part, t.view(-1), "sum",
                                                               self.group.group_name).view_as(t)
        dist.all_reduce(t, group=self.group)
        return t

    def _one_shot_fits(self, t: torch.Tensor) -> bool:
        """What the one-shot kernel takes: a contiguous CUDA bf16/fp32 tensor that fits the buffer, its
        size a multiple of 4 bytes and its start 16-byte aligned (as the buffer's)."""
        nbytes = t.numel() * t.element_size()
        return (self.symm is not None and t.is_cuda and t.dtype in (torch.bfloat16, torch.float32)
                and t.is_contiguous() and nbytes <= self.symm.numel() and nbytes % 4 == 0
                and t.storage_offset() * t.element_size() % 16 == 0)

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

    def smallest(self, value):
        """The least of every rank's `value`, on every rank."""
        values = [None] * self.world
        dist.all_gather_object(values, value, group=self.control)
        return min(values)


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
            tp.symm = one_shot_buffer(tp, weight.device)
    model._lvspec_tp = tp
    return tp


def one_shot_buffer(tp: TensorParallel, device: torch.device) -> torch.Tensor | None:
    """The group's buffer for one-shot all-reduces, set up on first call (a collective: every rank
    calls it at the same point, as `of` does when a model is loaded); None where reductions go
    through the group's all-reduce: gloo, `LVSPEC_TP_ALLREDUCE=nccl`, or symmetric memory failing."""
    choice = os.environ.get(ALL_REDUCE_ENV, "nccl")
    if choice not in ("oneshot", "nccl"):
        raise ValueError(f"{ALL_REDUCE_ENV} must be 'oneshot' or 'nccl', got {choice!r}")
    if choice == "nccl" or device.type != "cuda" or dist.get_backend(tp.group) != "nccl":
        return None
    name = tp.group.group_name
    if name not in _BUFFERS:
        buf, error = None, None
        try:
            # The one-shot kernel reads peers' memory directly; a multicast object is never wanted (one
            # can take a shared host's GPUs out of service), so the rendezvous must not create one.
            os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
            import torch.distributed._symmetric_memory as symm_mem

            torch.ops.symm_mem.one_shot_all_reduce_copy  # noqa: B018 - present in this build?
            buf = symm_mem.empty(ONE_SHOT_BYTES, dtype=torch.uint8, device=device)
            symm_mem.rendezvous(buf, tp.group)
        except Exception as e:  # noqa: BLE001 - any failure: NCCL carries the reductions
            buf, error = None, f"{type(e).__name__}: {e}"
        # One path for all ranks: a one-shot kernel waits for every peer's part.
        errors = [None] * tp.world
        dist.all_gather_object(errors, error, group=tp.control)
        failed = next((e for e in errors if e), None)
        if failed:
            print(f"lvspec rank {tp.rank}: one-shot all-reduce unavailable, tensor-parallel decoding reduces "
                  f"through NCCL ({failed})", flush=True)
            buf = None
        _BUFFERS[name] = buf
    return _BUFFERS[name]


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


