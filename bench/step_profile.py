"""Where one decoding step's GPU time goes, kernel by kernel (torch.profiler), with split attention.

    python -m bench.step_profile > profile.txt     # on a GPU

LLaVA-OV 0.5B then 7B (random weights, bf16), batch 128, every row at 3223 cached tokens of a
3328-token capacity, one new token: one captured step's time, then five eager steps profiled.
bench/split_step_profile_h100.txt is its output on an H100 (2026-12-06; run then as an inline
script with this body).
"""

import torch
from torch.profiler import ProfilerActivity, profile

from bench.realsize import build, graph_ms
from lvspec.adapter import text_config
from lvspec.decoder import TextDecoder


def main() -> None:
    for size in ("0.5b", "7b"):
        m = build("llava_onevision", size, "cuda")
        d = TextDecoder(m, text_config(m).vocab_size)
        bs, ctx = 128, 3223
        c = d.new_cache(bs, 3328)
        c.k.normal_()
        c.v.normal_()
        c.length.fill_(ctx)
        tok = torch.randint(0, 1000, (bs, 1), device="cuda")
        d.attention = {"step": "split", "verify": "split"}

        def fn():
            d.forward(c, tok)

        with torch.inference_mode():
            print(size, "graph ms", round(graph_ms(fn), 3), "weights GB", d.weight_bytes() / 1e9)
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
        d = m = c = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
