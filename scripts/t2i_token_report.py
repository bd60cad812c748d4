"""Where a DyFLUX's token routers send compute on Captioned Fashion-MNIST (issue 18; the B5 analogue of
`dydit plan`'s selectivity report).

    python3 scripts/t2i_token_report.py runs/t2i-dyflux-c-0.5/ema docs/results/b5_tokens_centred

Samples 64 balanced captions (Euler 20, CFG 4) on the fast engine, recording every routed block's image-token
mask at every step, and writes OUT.md (kept share on object vs background patches per block and step band;
object = a 4×4 patch of the final image with mean intensity > 0.1), OUT.json and OUT.png (token-keep maps).
"""
import json
import sys
from pathlib import Path

import torch

import dydit
from dydit.data.captioned_fmnist import balanced_caption_ids
from dydit.dynamic import DynamicContext, flops_spec
from dydit.dynamic.report import summarize
from dydit.dynamic.token_report import selectivity_table, token_keep_maps, token_selectivity
from dydit.t2i import patch_size, sample_captions, set_t2i_token_geometry


def main(path: str, out: str, num: int = 64):
    model = dydit.load(path).eval()
    set_t2i_token_geometry(model)
    ctx = DynamicContext("fast", record_usage=True, record_tokens=True)
    ids = balanced_caption_ids(num, seed=0)
    images = sample_captions(model, ids, steps=20, cfg_scale=4.0, seed=0, dyn=ctx)
    sel = token_selectivity(ctx.token_masks, images, patch_size(model))
    sel["flops_ratio"] = summarize(ctx.usage, flops_spec(model), 2)["flops_ratio"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(f"{path}: realised FLOPs ratio {sel['flops_ratio']:.3f}\n\n" + selectivity_table(sel))
    out.with_suffix(".json").write_text(json.dumps(sel, indent=2) + "\n")
    token_keep_maps(ctx.token_masks, images, patch_size(model), out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
