"""A CUDA smoke test of the engine, for the device machine (``scripts/gpu-check.sh``).

Greedy outputs of the engine equal ``model.generate`` token for token, on the device, for 8
prompts of mixed lengths with chunked prefill on and off: exactly in fp32, and as an agreement
share in bf16 (reduced precision lets near-ties flip; reported, not asserted). Every block is
free at the end. Runs on CPU too (``--device cpu``), which is how it is checked without a GPU.
Exits non-zero on a mismatch in fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import EngineConfig  # noqa: E402
from engine.demo_model import build_demo_model  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from scheduler.builder import build_engine, generate  # noqa: E402

LENGTHS = [5, 17, 33, 64, 100, 130, 250, 400]
MAX_NEW = 24


def reference(model_dir: str, prompts: list[list[int]], device: str, dtype: torch.dtype) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            gen = model.generate(ids, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False)
            out.append(gen[0, len(p):].tolist())
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default=None, help="default: a tiny demo model built in a temporary folder")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    model_dir = args.model or str(build_demo_model(Path(tempfile.mkdtemp()) / "demo-tiny", "tiny"))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 8000, (n,), generator=g).tolist() for n in LENGTHS]
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    results, ok = {"device": args.device, "runs": []}, True
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    for dtype in ("float32", "bfloat16"):
        want = reference(model_dir, prompts, args.device, getattr(torch, dtype))
        for chunked in (True, False):
            config = EngineConfig.build(model_dir, device=args.device, dtype=dtype, kv_cache_bytes=64 << 20,
                                        max_num_batched_tokens=64 if chunked else 512, max_num_seqs=8,
                                        enable_chunked_prefill=chunked)
            core, runner = build_engine(config)
            got = generate(core, runner, prompts, params)
            core.check_integrity()
            equal = sum(a == b for a, b in zip(got, want))
            agree = sum(x == y for a, b in zip(got, want) for x, y in zip(a, b)) / (len(prompts) * MAX_NEW)
            free = core.pool.num_used_blocks == 0
            run = {"dtype": dtype, "chunked_prefill": chunked, "equal_sequences": f"{equal}/{len(prompts)}",
                   "token_agreement": round(agree, 4), "all_blocks_free": free}
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            if dtype == "float32" and (equal != len(prompts) or not free):
                ok = False
    results["passed"] = ok
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print("PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
