"""Where one decoding forward's GPU time goes, kernel by kernel (torch.profiler), with split attention.

    python -m bench.step_profile > profile.txt                       # on a GPU: the draft step and ar's step
    python -m bench.step_profile --sizes 7b --batch 256 --live 174 --q 8 --pack   # an lvspec verify at bulk

LLaVA-OV decoders (random weights, bf16), `--batch` slots of which the first `--live` decode, every
row at `--ctx` cached tokens of a `--capacity`-token cache, `--q` new tokens a row: one captured
forward's time, then five eager forwards profiled. `--pack`: the verify as the engine runs it at
bulk, its weights over each live row's own K + 1 tokens only (own K cycling 0..q-1: 4.5 tokens a
row, as the bulk frontier's lvspec verifies at 256 ran 772 tokens for 174 rows); the relevance probe
is left out. `--compare`: also the captured forward with RoPE and the cache writes as eager ops
(`decoder.eager_rotate_and_store`: the split path before `attention.rotate_and_store` fused them).
bench/split_step_profile_h100.txt is the default's output on an H100 (2026-12-06; run then as an
inline script with this body).
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.realsize import build, graph_ms
from lvspec.adapter import text_config
from lvspec import decoder
from lvspec.decoder import TextDecoder, eager_rotate_and_store, packed_tokens, packed_width


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["0.5b", "7b"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--live", type=int, help="decoding rows (default: all)")
    ap.add_argument("--ctx", type=int, default=3223)
    ap.add_argument("--capacity", type=int, default=3328)
    ap.add_argument("--q", type=int, default=1)
    ap.add_argument("--pack", action="store_true")
    ap.add_argument("--compare", action="store_true", help="also time the forward with eager RoPE and cache writes")
    args = ap.parse_args(argv)
    bs, live_rows = args.batch, args.live or args.batch
    for size in args.sizes:
        m = build("llava_onevision", size, "cuda")
        d = TextDecoder(m, text_config(m).vocab_size)
        c = d.new_cache(bs, args.capacity)
        c.k.normal_()
        c.v.normal_()
        c.length.fill_(args.ctx)
        tok = torch.randint(0, 1000, (bs, args.q), device="cuda")
        live = torch.arange(bs, device="cuda") < live_rows
        d.attention = {"step": "split", "verify": "split"}
        pack = None
        if args.pack:
            own = torch.arange(bs, device="cuda") % args.q
            want = live[:, None] & (torch.arange(args.q, device="cuda") <= own[:, None])
            pack = packed_tokens(want, packed_width(int(want.sum()), bs * args.q) or bs * args.q)

        def fn():
            d.forward(c, tok, live=live, pack=pack)

        with torch.inference_mode():
            tokens = pack.numel() if pack is not None else bs * args.q
            print(size, f"batch {bs}, live {live_rows}, q {args.q}, tokens {tokens}: graph ms",
                  round(graph_ms(fn), 3), "weights GB", d.weight_bytes() / 1e9)
            if args.compare:
                fused = decoder.rotate_and_store
                decoder.rotate_and_store = eager_rotate_and_store
                try:
                    print(size, "graph ms with eager RoPE and cache writes", round(graph_ms(fn), 3))
                finally:
                    decoder.rotate_and_store = fused
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=24, max_name_column_width=60))
        d = m = c = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
