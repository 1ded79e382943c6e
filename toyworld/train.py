"""Train the toy target/draft pairs of both families (what `make toymodels` runs).

    python -m toyworld.train --all [--device cuda] [--out toyworld/models]
    python -m toyworld.train --all --edition 2          # the second edition, into toyworld/models_v2

Seeded and reproducible up to floating-point nondeterminism of the device. Videos come from a pool
of rendered, H.264-encoded and decoded clips; captions are drawn fresh every step, at a filler
entropy named in the prompt (or the default one when the prompt names none). The target trains
until it reads every attribute; the draft stops early, at a set anchor accuracy, so that it is
weaker on exactly the visual facts LVSpec must protect.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.frames import uniform_indices
from toyworld import families, grammar
from toyworld.scene import NUM_FRAMES, Scene, decode_mp4, make_clip

TRAIN_TAG, VAL_TAG = 0x7A1, 0x7A2  # seed-sequence tags: training and validation clips never coincide
FRAME_CHOICES = (4, 6, 8, 8, 8, 10, 12)


@dataclass
class RoleSpec:
    max_steps: int
    lr: float
    stop_anchor_acc: float  # stop once validation anchor accuracy reaches this
    eval_every: int
    max_minutes: float  # wall-clock budget, a safety net on slow machines


ROLE_SPECS = {
    "target": RoleSpec(max_steps=6000, lr=1e-3, stop_anchor_acc=0.998, eval_every=200, max_minutes=240),
    "draft": RoleSpec(max_steps=6000, lr=2e-3, stop_anchor_acc=0.80, eval_every=25, max_minutes=120),
}


@contextlib.contextmanager
def packed_qwen_vision_attention():
    """Run Qwen2.5-VL's vision attention as one batched SDPA when all its sequences are equally long.

    HF's non-flash path loops over every frame pair and window in Python, which dominates a toy
    training step on a GPU. Toy frames are all one size, so the sequences are too. Training only;
    `tests/test_toyworld.py` checks it matches the stock forward.
    """
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    stock = m.Qwen2_5_VLVisionAttention.forward

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        lengths = cu_seqlens.diff()
        if self.config._attn_implementation != "sdpa" or bool((lengths != lengths[0]).any()):
            return stock(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq, n = hidden_states.shape[0], lengths.numel()
        q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = m.apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        q, k, v = (t.reshape(n, seq // n, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(seq, -1))

    m.Qwen2_5_VLVisionAttention.forward = forward
    try:
        yield
    finally:
        m.Qwen2_5_VLVisionAttention.forward = stock


def _one_thread(*_):
    torch.set_num_threads(1)  # many parallel producers: one thread each, or they fight over cores


def _clip(job: tuple[tuple[int, ...], int]):
    # Longer entropy than scene.clip_seed's (seed, index): training clips never equal evaluation ones.
    seed_entropy, edition = job
    scene, data = make_clip(int(np.random.SeedSequence(seed_entropy).generate_state(1)[0]), edition=edition)
    return scene, decode_mp4(data)


def clip_pool(n: int, entropy: tuple[int, ...], workers: int, cache: Path | None = None, edition: int = 1):
    """Render, encode and decode n clips in parallel: (frames uint8 [n, T, H, W, 3], scenes).

    With `cache`, the pool is saved there once and memory-mapped by every later run.
    """
    name = "-".join(map(str, (*entropy, n))) + ("" if edition == 1 else f"-e{edition}")
    if cache and (cache / f"{name}.json").exists():
        scenes = [Scene.from_json(d) for d in json.loads((cache / f"{name}.json").read_text())]
        return np.load(cache / f"{name}.npy", mmap_mode="r"), scenes
    seeds = [((*entropy, i), edition) for i in range(n)]
    with mp.get_context("fork").Pool(workers, initializer=_one_thread) as pool:
        out = pool.map(_clip, seeds, chunksize=64)
    frames, scenes = np.stack([f for _, f in out]), [s for s, _ in out]
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cache / f"{name}.npy", frames)
        (cache / f"{name}.json").write_text(json.dumps([s.to_json() for s in scenes]))
    return frames, scenes


def answer_start(input_ids: torch.Tensor, tokenizer) -> int:
    """Index of the first answer token: right after the last `<|im_start|>assistant\\n`."""
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    header = len(tokenizer("assistant\n")["input_ids"])
    return int((input_ids == im_start).nonzero()[-1]) + 1 + header


def make_batch(processor, frames: list[np.ndarray], captions: list[grammar.Caption], prompts: list[str]):
    """Processor inputs plus `labels` (answer tokens only) and `anchor` (answer tokens that are anchors)."""
    tok = processor.tokenizer
    texts = [families.chat_text(processor, p, c.text) for p, c in zip(prompts, captions)]
    batch = processor(text=texts, videos=frames, return_tensors="pt", padding=True)
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    anchor = torch.zeros_like(ids, dtype=torch.bool)
    for row, cap in enumerate(captions):
        enc = tok(cap.text, return_offsets_mapping=True)
        start = answer_start(ids[row], tok)
        n = len(enc["input_ids"])
        if ids[row, start:start + n].tolist() != enc["input_ids"]:
            raise AssertionError("answer tokenizes differently inside the chat text")
        labels[row, start:start + n + 1] = ids[row, start:start + n + 1]  # caption + <|im_end|>
        marks = [lab == "anchor" for lab in grammar.token_labels(cap, enc["offset_mapping"])]
        anchor[row, start:start + n] = torch.tensor(marks)
    batch["labels"] = labels
    batch["anchor"] = anchor
    return batch


class Batches(IterableDataset):
    """Endless training batches drawn from the clip pool; each worker has its own seeded stream."""

    def __init__(self, processor, frames, scenes, batch_size: int, entropy: tuple[int, ...], edition: int = 1,
                 style: str = "target"):
        self.processor, self.frames, self.scenes = processor, frames, scenes
        self.batch_size, self.entropy, self.edition, self.style = batch_size, entropy, edition, style

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([*self.entropy, info.id if info else 0])
        while True:
            idx = rng.integers(len(self.scenes), size=self.batch_size)
            n_frames = int(rng.choice(FRAME_CHOICES))
            frames, captions, prompts = [], [], []
            for i in idx:
                keep = uniform_indices(NUM_FRAMES, n_frames)
                frames.append(self.frames[i][keep])
                level = None if rng.random() < 0.5 else float(rng.choice(grammar.FILLER_LEVELS))
                h = grammar.DEFAULT_FILLER_ENTROPY if level is None else level
                captions.append(grammar.make_caption(self.scenes[i], rng, h, self.edition, self.style))
                prompts.append(grammar.prompt_for(level))
            yield make_batch(self.processor, frames, captions, prompts)


def model_inputs(batch, device):
    return {k: v.to(device) for k, v in batch.items() if k not in ("labels", "anchor")}


@torch.no_grad()
def teacher_forced_accuracy(model, batches, device) -> dict[str, float]:
    """Argmax accuracy against the ground-truth caption at anchor and at filler tokens."""
    model.eval()
    hits = {"anchor": [0, 0], "filler": [0, 0]}
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**model_inputs(batch, device)).logits.float()
        pred = logits[:, :-1].argmax(-1).cpu()
        gold, anchor = batch["labels"][:, 1:], batch["anchor"][:, 1:]
        valid = gold != -100
        for name, mask in (("anchor", valid & anchor), ("filler", valid & ~anchor)):
            hits[name][0] += int((pred[mask] == gold[mask]).sum())
            hits[name][1] += int(mask.sum())
    model.train()
    return {f"{k}_acc": v[0] / max(v[1], 1) for k, v in hits.items()}


def validation_batches(processor, frames, scenes, seed: int, batch_size: int = 128, edition: int = 1,
                       style: str = "target"):
    rng = np.random.default_rng([seed, VAL_TAG])
    keep = uniform_indices(NUM_FRAMES, 8)
    out = []
    for lo in range(0, len(scenes), batch_size):
        chunk = range(lo, min(lo + batch_size, len(scenes)))
        caps = [grammar.make_caption(scenes[i], rng, edition=edition, style=style) for i in chunk]
        out.append(make_batch(processor, [frames[i][keep] for i in chunk], caps, [grammar.PROMPT] * len(caps)))
    return out


def train_one(family: str, role: str, processor, pool, val, args, device) -> dict:
    """Train one model of `family` for `role`; save it with its processor; return its log."""
    from transformers import AutoModelForImageTextToText

    spec = ROLE_SPECS[role]
    torch.manual_seed(args.seed * 100 + families.ROLES.index(role))
    if args.init_from:  # resume: a second stage on another machine, say (with the checkpoint's own processor)
        init = Path(args.init_from) / f"{family}-{role}"
        model = AutoModelForImageTextToText.from_pretrained(init, dtype=torch.float32).to(device)
        earlier = json.loads((init / "train_log.json").read_text())
    else:
        config = families.build_config(family, role, processor.tokenizer)
        model = AutoModelForImageTextToText.from_config(config).to(device)
        earlier = None
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup, budget = 200, spec.max_minutes * 60

    def set_lr(step: int, elapsed: float) -> None:
        # Cosine decay over whichever budget (steps or minutes) runs out first.
        progress = min(1.0, max(step / spec.max_steps, elapsed / budget))
        scale = min(1.0, step / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = spec.lr * scale

    entropy = (args.seed, TRAIN_TAG, families.FAMILIES.index(family), families.ROLES.index(role))
    # Edition 2: each role learns its own phrasing style (grammar.STYLES), the draft its own favourites.
    batches = Batches(processor, *pool, args.batch_size, entropy, args.edition, role if args.edition == 2 else "target")
    loader = DataLoader(batches, batch_size=None,
                        num_workers=args.workers, prefetch_factor=4 if args.workers else None,
                        worker_init_fn=_one_thread)
    log = {"family": family, "role": role, "size": asdict(families.SIZES[(family, role)]),
           "params": sum(p.numel() for p in model.parameters()), "spec": asdict(spec),
           "batch_size": args.batch_size, "seed": args.seed, "edition": args.edition, "device": str(device), "evals": [],
           "resumed_from": earlier}
    out_dir = Path(args.out) / f"{family}-{role}"
    start, step, stop_reason, bad_steps = time.time(), 0, "max_steps", 0
    best = (-1.0, None)  # the checkpoint saved is the best one validated
    for step, batch in enumerate(loader, start=1):
        set_lr(step, time.time() - start)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**model_inputs(batch, device), labels=batch["labels"].to(device))
        if not torch.isfinite(out.loss):
            bad_steps += 1
            opt.zero_grad(set_to_none=True)
            if bad_steps > 20:
                stop_reason = "diverged (non-finite loss)"
                break
            continue
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % spec.eval_every == 0 or step == spec.max_steps:
            acc = teacher_forced_accuracy(model, val, device)
            entry = {"step": step, "loss": round(out.loss.item(), 4), "seconds": round(time.time() - start, 1), **acc}
            log["evals"].append(entry)
            if acc["anchor_acc"] > best[0]:
                best = (acc["anchor_acc"], {k: v.detach().clone() for k, v in model.state_dict().items()})
                save(copy.deepcopy(model), processor, log, out_dir, partial=True)  # survives an interrupted run
            print(f"[{family}/{role}] step {step} loss {entry['loss']:.3f} anchor {acc['anchor_acc']:.3f} "
                  f"filler {acc['filler_acc']:.3f} ({entry['seconds']:.0f}s)", flush=True)
            if acc["anchor_acc"] >= spec.stop_anchor_acc and step >= args.min_steps:
                stop_reason = f"anchor_acc >= {spec.stop_anchor_acc}"
                break
        if step >= spec.max_steps:
            break
        if time.time() - start > budget:
            stop_reason = "time budget"
            break
    log.update(steps=step, stop_reason=stop_reason, seconds=round(time.time() - start, 1), skipped_steps=bad_steps,
               saved_anchor_acc=best[0])
    if best[1] is not None:
        model.load_state_dict(best[1])
    save(model, processor, log, out_dir)
    print(f"[{family}/{role}] saved {out_dir} after {step} steps ({stop_reason})", flush=True)
    return log


def save(model, processor, log: dict, out_dir: Path, partial: bool = False) -> None:
    """Write `model` (in bf16, like real checkpoints), its processor and the training log."""
    model.to(torch.bfloat16).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "train_log.json").write_text(json.dumps({**log, "partial": partial}, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="both families, target and draft")
    ap.add_argument("--family", choices=families.FAMILIES, action="append")
    ap.add_argument("--role", choices=families.ROLES, action="append")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=40000, help="distinct training clips")
    ap.add_argument("--val", type=int, default=512, help="validation clips")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=max(1, (mp.cpu_count() or 2) - 2))
    ap.add_argument("--target-minutes", type=float, help="time budget of each target")
    ap.add_argument("--draft-minutes", type=float, help="time budget of each draft")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--edition", type=int, choices=(1, 2), default=1, help="toy world edition (grammar, scenes)")
    ap.add_argument("--out", help="models dir (default: the edition's shipped one)")
    ap.add_argument("--steps", type=int, help="override max steps (smoke runs)")
    ap.add_argument("--init-from", help="start from the checkpoints in this models dir (second stage)")
    ap.add_argument("--lr", type=float, help="override the learning rate")
    ap.add_argument("--min-steps", type=int, default=0, help="no early stop before this many steps (a second stage)")
    ap.add_argument("--pool-cache", type=Path, help="save / reuse rendered clip pools here")
    ap.add_argument("--pool-only", action="store_true", help="render the pools into --pool-cache and stop")
    args = ap.parse_args(argv)
    fams = families.FAMILIES if args.all or not args.family else args.family
    roles = families.ROLES if args.all or not args.role else args.role
    if args.steps:
        for spec in ROLE_SPECS.values():
            spec.max_steps, spec.eval_every = args.steps, min(spec.eval_every, args.steps)
    for spec in ROLE_SPECS.values():
        spec.lr = args.lr or spec.lr
    for role, minutes in (("target", args.target_minutes), ("draft", args.draft_minutes)):
        if minutes:
            ROLE_SPECS[role].max_minutes = minutes
    args.out = args.out or str(families.models_dir(args.edition))
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True

    t0 = time.time()
    vocab, merges = families.train_bpe(args.seed, edition=args.edition)
    pool = clip_pool(args.pool, (args.seed, TRAIN_TAG), args.workers, args.pool_cache, args.edition)
    val_pool = clip_pool(args.val, (args.seed, VAL_TAG), args.workers, args.pool_cache, args.edition)
    print(f"tokenizer + {args.pool} training clips + {args.val} validation clips in {time.time() - t0:.0f}s", flush=True)
    if args.pool_only:
        return
    for family in fams:
        if args.init_from:  # a second stage keeps the tokenizer its checkpoints were trained with
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(Path(args.init_from) / f"{family}-target")
        else:
            processor = families.build_processor(family, families.build_tokenizer(family, vocab, merges))
        for role in roles:
            style = role if args.edition == 2 else "target"
            val = validation_batches(processor, *val_pool, seed=args.seed, edition=args.edition, style=style)
            with packed_qwen_vision_attention():
                train_one(family, role, processor, pool, val, args, device)


if __name__ == "__main__":
    main()
