"""DPO on the drift oracle's pairs without a server: how fast, and how steadily, the LoRA adapter
learns a taste, and unlearns it after the switch, per pair trained. It isolates the learning from
the serving policies, and is how the paper bench's trainer settings (``bench/paper.py``,
``Settings``) were chosen; BENCHMARKS.md has the runs.

Each pair: a random shipped prompt in the chat template, two answers sampled from the current
adapter (16 tokens, temperature 1), judged by the oracle (vowels liked, consonants from pair
``--switch`` on); ties and blank answers are skipped. The pairs go through ``FinetuneExecutor``
(the server's own) in full steps of ``--grad-accum``. Every ``--every`` pairs: 24 prompts x 4
answers with fixed seeds, against the base model's with the same seeds, judged under the current
taste: the win rate (ties 1/2), the liked-letter share and the letters per answer (a collapse
into newlines or a repeated token shows there).

    python scripts/dpo_offline.py --pairs 600 --switch 200 --grad-accum 16 --rpo-alpha 1
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.paper import PRETRAINED_MODEL, pretrained_model  # noqa: E402
from clients.drift import win_rate  # noqa: E402
from clients.oracle import drift_oracle  # noqa: E402
from clients.workload import default_prompts  # noqa: E402
from engine.config import TrainingConfig  # noqa: E402
from engine.model_loader import load_model  # noqa: E402
from engine.plan import FinetuneChunk, PreferencePair  # noqa: E402
from trainer.adapters import attach_adapters  # noqa: E402
from trainer.executor import FinetuneExecutor  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"default: {PRETRAINED_MODEL} (built once)")
    p.add_argument("--pairs", type=int, default=600)
    p.add_argument("--switch", type=int, default=200, help="the pair from which consonants are liked")
    p.add_argument("--learning-rate", type=float, default=5e-3)
    p.add_argument("--grad-accum", type=int, default=16)
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--rpo-alpha", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sampling of the pairs' and the evaluation's answers (0: off)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--every", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the curve as JSON here")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model, tokenizer = load_model(args.model or pretrained_model(), torch.device("cpu"))
    config = TrainingConfig(lr=args.learning_rate, grad_accum=args.grad_accum, dpo_beta=args.dpo_beta,
                           rpo_alpha=args.rpo_alpha)
    peft_model = attach_adapters(model, config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    executor = FinetuneExecutor(peft_model, config, pad_id=pad)
    oracle = drift_oracle(switch_s=float(args.switch))  # "time" here counts pairs
    prompts, rng = default_prompts(), random.Random(args.seed)

    def answers(prompt: str, n: int, seed: int) -> tuple[list[str], list[int]]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        torch.manual_seed(seed)
        with torch.no_grad():
            out = peft_model.generate(ids.repeat(n, 1), attention_mask=torch.ones_like(ids).repeat(n, 1), do_sample=True,
                                      temperature=1.0, top_k=args.top_k, top_p=args.top_p, max_new_tokens=16, pad_token_id=pad)
        return [tokenizer.decode(o[ids.shape[1]:], skip_special_tokens=True) for o in out], ids[0].tolist()

    def evaluation() -> list[str]:
        return [a for i, prompt in enumerate(prompts[:24]) for a in answers(prompt, 4, 1000 + i)[0]]

    base = evaluation()

    def point(done: int, t0: float) -> dict:
        texts, phase = evaluation(), oracle.phase_at(done)
        scores = [phase.score(t) for t in texts]
        letters = sum(c in string.ascii_letters for t in texts for c in t) / len(texts)
        row = {"pairs": done, "phase": phase.name, "win_rate": round(win_rate(scores, [phase.score(t) for t in base]), 3),
               "liked_share": round(sum(scores) / len(scores), 3), "letters_per_answer": round(letters, 1),
               "version": executor.version, "elapsed_s": round(time.perf_counter() - t0, 1), "sample": texts[0][:48]}
        print(json.dumps(row), flush=True)
        return row

    t0 = time.perf_counter()
    curve, batch, done, task = [point(0, t0)], [], 0, 0
    while done < args.pairs:
        (a, b), prompt_ids = answers(prompts[rng.randrange(len(prompts))], 2, rng.randrange(1 << 30))
        judged = oracle.prefer(a, b, done) if a.strip() and b.strip() else None
        if judged is None:
            continue
        # as the server's trainer encodes a pair: the answer's tokens, then EOS
        chosen, rejected = (tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in judged)
        pair = PreferencePair(f"p{done}", prompt_ids, chosen, rejected)
        task += 1
        pair.ref_chosen, pair.ref_rejected = executor.run(FinetuneChunk(task, "reference", [pair])).ref_logprobs[pair.pair_id]
        batch.append(pair)
        done += 1
        if len(batch) == args.grad_accum:
            task += 1
            executor.run(FinetuneChunk(task, "gradient", batch, step=True))
            batch = []
        if done % args.every == 0:
            curve.append(point(done, t0))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "curve": curve}, indent=1))


if __name__ == "__main__":
    main()
