"""Step time of the embedded default (`hf-dograph train`): plain `Trainer` vs `DoGraphTrainer`, same run.

GPT-2 2×64, B = 16, T = 128, the 259-token byte vocabulary, with the `tiny` recipe's DoGraph settings, on
random token batches. Plain and DoGraph steps alternate (order flipped each round) on the same batches; a
step is what `Trainer.train()` does per optimizer step (training_step, clipping, optimizer, scheduler,
zero_grad). DoGraph's domain model starts after one batch of warm-up, so its refits (every 20 steps) fall
inside the measured rounds at their amortized rate; "ratio of sums" includes them, the median does not.

It runs on whatever `hf_dograph` is importable, so the same script measures an older version too:

    python benchmarks/tiny_step.py --rounds 60                         # this checkout
    git worktree add /tmp/hf_dograph_old e0c5c7d                        # before persistent domains
    PYTHONPATH=/tmp/hf_dograph_old python benchmarks/tiny_step.py --rounds 60

(e0c5c7d ran K-means with scikit-learn on every micro-batch; the script gives it the `tiny` recipe's
settings of the time: m = 4, k = 64, one K-means start, ε = 1.0.)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import paired_rounds  # noqa: E402 - the standard library only at import: any hf_dograph works


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=60, help="measured rounds (after 2 warm-up rounds)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args(argv)

    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from hf_dograph import DoGraphConfig, DoGraphTrainer

    transformers.logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
    persistent = "domain_mode" in DoGraphConfig.__dataclass_fields__
    warmup = 2
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=259, n_positions=128, n_embd=64, n_layer=2, n_head=4))
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 259, (16, 128), generator=g) for _ in range(a.rounds + warmup)]
    batches = [{"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)} for x in ids]
    common = dict(output_dir=f"/tmp/tiny_step_{os.getpid()}", per_device_train_batch_size=16, report_to=[],
                  save_strategy="no", disable_tqdm=True, learning_rate=3e-3, seed=0, use_cpu=True)
    # The tiny recipe's DoGraph settings at each version (see the module docstring).
    settings = (dict(projection_dim=64, domain_warmup_samples=16) if persistent
                else dict(num_domains=4, projection_dim=64, kmeans_n_init=1, uncertainty_eps=1.0))
    trainers = {"plain": Trainer(model=copy.deepcopy(base), args=TrainingArguments(**common)),
                "dograph": DoGraphTrainer(model=copy.deepcopy(base), args=DoGraphConfig(**common, **settings))}
    for t in trainers.values():
        t.create_optimizer_and_scheduler(num_training_steps=len(batches))
        t.current_gradient_accumulation_steps = 1

    rounds, _ = paired_rounds(trainers, batches)
    wall = {name: seconds[warmup:] for name, seconds in rounds.items()}
    ratios = [d / p for d, p in zip(wall["dograph"], wall["plain"])]
    result = {"version": "persistent domains" if persistent else "per-micro-batch K-means",
              "plain_ms": round(1000 * statistics.median(wall["plain"]), 2),
              "dograph_ms": round(1000 * statistics.median(wall["dograph"]), 2),
              "ratio_median": round(statistics.median(ratios), 3),
              "ratio_of_sums": round(sum(wall["dograph"]) / sum(wall["plain"]), 3),
              "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)], "rounds": len(ratios)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
