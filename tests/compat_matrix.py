"""The drop-in compatibility matrix: each feature/model with the plain `Trainer` and with `DoGraphTrainer`.

For every case, the same 2 SGD steps (same data order, same initial weights) are run by

* `Trainer` — the reference;
* `DoGraphTrainer(mixing_strategy="uniform")`;
* `DoGraphTrainer(num_domains=1)` on each gradient engine (persistent domains with no warm-up, so the whole
  DoGraph path runs: sketches, the domain model, the weighted gradient) — one domain means weight 1;

and must end with the Trainer's parameters (1e-6 relative) and log the Trainer's losses. Then DoGraph with
three domains (objective `robust`) must run with weights that are not all 1. A combination DoGraph refuses on purpose is listed
in `REFUSED` with the reason; the matrix checks that it is refused at construction with that message.

`tests/test_compatibility.py` runs it; `python tests/compat_matrix.py` prints the README's table.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import torch
from datasets import Dataset

VOCAB = 61
STEPS = 2
BATCH = 8  # per optimizer step (per_device_train_batch_size × gradient_accumulation_steps)
ENGINES = ("factored", "opacus")
PARAM_RTOL = 1e-6
LOSS_RTOL = 1e-5


# --------------------------------------------------------------------------------------------- models
def _lm(config_cls, seed=0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=VOCAB, **kw)
    return AutoModelForCausalLM.from_config(cfg)


def gpt2(**kw):
    from transformers import GPT2Config

    return _lm(GPT2Config, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, **kw)


def _decoder(config_name, **extra):
    import transformers

    cfg_cls = getattr(transformers, config_name)

    def build():
        return _lm(cfg_cls, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=1,
                   pad_token_id=0, **extra)

    return build


llama = _decoder("LlamaConfig", attention_dropout=0.0)
qwen2 = _decoder("Qwen2Config", attention_dropout=0.0)
mistral = _decoder("MistralConfig", attention_dropout=0.0)
phi3 = _decoder("Phi3Config", attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
gemma = _decoder("GemmaConfig", attention_dropout=0.0, head_dim=8)
gemma2 = _decoder("Gemma2Config", attention_dropout=0.0, head_dim=8, sliding_window=16,
                  attn_implementation="eager")
llama_tied_pad = _decoder("LlamaConfig", attention_dropout=0.0, tie_word_embeddings=True)


def gpt2_lora():
    from peft import LoraConfig, get_peft_model

    model = gpt2()
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0,
                                            fan_in_fan_out=True))
    torch.manual_seed(1)
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return peft


def _classifier(arch: str, num_labels: int, problem_type: str | None):
    def build():
        import transformers

        torch.manual_seed(0)
        if arch == "gpt2":
            cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
                                          num_labels=num_labels, problem_type=problem_type)
            return transformers.GPT2ForSequenceClassification(cfg)
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, pad_token_id=0, num_labels=num_labels,
                                      problem_type=problem_type)
        return transformers.BertForSequenceClassification(cfg)

    return build


# ----------------------------------------------------------------------------------------------- data
def lm_rows(n=BATCH * STEPS, seq=12, ragged=False, seed=0) -> list[dict]:
    """Token rows of 3 vocabulary groups (so that their gradients differ); ragged: lengths 6..seq."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    width = (VOCAB - 2) // 3
    for i in range(n):
        length = int(torch.randint(6, seq + 1, (1,), generator=g)) if ragged else seq
        lo = 2 + (i % 3) * width
        ids = torch.randint(lo, lo + width, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def pad_collator(rows: list[dict]) -> dict:
    """Right padding with pad id 0 and labels -100 (what DataCollatorForLanguageModeling gives)."""
    t = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    labels = torch.full((len(rows), t), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def flattening_collator():
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_tensors="pt")


def classification_rows(problem: str, num_labels: int, n=BATCH * STEPS, seq=10, seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(5, seq + 1, (1,), generator=g))
        ids = torch.randint(2, VOCAB, (length,), generator=g).tolist()
        if problem == "regression":
            label = float(torch.randn(1, generator=g))
        elif problem == "multi_label":
            label = (torch.rand(num_labels, generator=g) > 0.5).float().tolist()
        else:
            label = int(i % num_labels)
        rows.append({"input_ids": ids, "label": label})
    return rows


def classification_collator(rows: list[dict]) -> dict:
    batch = pad_collator([{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows])
    labels = [r["label"] for r in rows]
    dtype = torch.long if isinstance(labels[0], int) else torch.float32
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": torch.tensor(labels, dtype=dtype)}


# ---------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One row of the matrix."""

    name: str
    model: Callable
    rows: Callable = lm_rows
    collator: Callable | None = None  # None: pad_collator
    args: dict = field(default_factory=dict)  # TrainingArguments overrides (both trainers)
    setup: Callable | None = None  # called with each trainer before train() (e.g. install a GradScaler)
    param_rtol: float = PARAM_RTOL
    loss_rtol: float = LOSS_RTOL
    domains_column: bool = True  # whether the 3-domain run can show weights moving (not when step 1 is skipped)


def _install_grad_scaler(**kw):
    def setup(trainer):
        # What accelerate does on CUDA with fp16: a GradScaler on the accelerator, used by the backward and by
        # the optimizer wrapper (unscale, inf check, step skipped, scale updated). On CPU, torch's CPU
        # GradScaler. Only the scaling is simulated: fp16 autocast itself is not (accelerate would wrap the
        # forward in autocast, whose rounding the bf16 row covers).
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", **kw)

    return setup


CASES = [
    Case("GPT-2, padded ragged batches", gpt2, rows=lambda: lm_rows(ragged=True)),
    Case("Llama, padded ragged batches", llama, rows=lambda: lm_rows(ragged=True)),
    Case("Qwen2", qwen2, rows=lambda: lm_rows(ragged=True)),
    Case("Mistral", mistral, rows=lambda: lm_rows(ragged=True)),
    Case("Phi3", phi3, rows=lambda: lm_rows(ragged=True)),
    Case("Gemma (scaled embedding)", gemma, rows=lambda: lm_rows(ragged=True)),
    Case("Gemma2", gemma2, rows=lambda: lm_rows(ragged=True)),
    Case("GPT-2 + LoRA", gpt2_lora, rows=lambda: lm_rows(ragged=True)),
    Case("tied embeddings with a pad id (Llama)", llama_tied_pad, rows=lambda: lm_rows(ragged=True)),
    Case("label smoothing 0.1 (Llama)", llama, rows=lambda: lm_rows(ragged=True), args={"label_smoothing_factor": 0.1}),
    Case("gradient accumulation 2", gpt2, rows=lambda: lm_rows(ragged=True), args={"gradient_accumulation_steps": 2}),
    Case("gradient accumulation 4", llama, rows=lambda: lm_rows(ragged=True), args={"gradient_accumulation_steps": 4}),
    Case("gradient checkpointing, reentrant", llama, rows=lambda: lm_rows(ragged=True),
         args={"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}),
    Case("gradient checkpointing, non-reentrant", gpt2, rows=lambda: lm_rows(ragged=True),
         args={"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}),
    # bf16: the engines form dW from the same bf16 tensors as autograd but in another order: equal to bf16's
    # rounding (the update within ~5e-3, bf16's unit roundoff being 3.9e-3).
    Case("bf16 autocast", llama, rows=lambda: lm_rows(ragged=True), args={"bf16": True}, param_rtol=1e-4,
         loss_rtol=1e-4),
    Case("fp16 GradScaler (simulated on CPU)", llama, rows=lambda: lm_rows(ragged=True),
         setup=_install_grad_scaler(init_scale=2.0 ** 10)),
    Case("fp16 GradScaler, overflow skips a step", gpt2, rows=lambda: lm_rows(ragged=True),
         setup=_install_grad_scaler(init_scale=2.0 ** 127, backoff_factor=2.0 ** -110), domains_column=False),
    Case("DataCollatorWithFlattening (packing)", llama, rows=lambda: lm_rows(ragged=True),
         collator=flattening_collator),
    Case("sequence classification, single-label (GPT-2)", _classifier("gpt2", 3, None),
         rows=lambda: classification_rows("single", 3), collator=lambda: classification_collator),
    Case("sequence classification, single-label (BERT)", _classifier("bert", 3, None),
         rows=lambda: classification_rows("single", 3), collator=lambda: classification_collator),
    Case("sequence classification, multi-label", _classifier("bert", 4, "multi_label_classification"),
         rows=lambda: classification_rows("multi_label", 4), collator=lambda: classification_collator),
    Case("sequence classification, regression", _classifier("gpt2", 1, None),
         rows=lambda: classification_rows("regression", 1), collator=lambda: classification_collator),
]

# (case name, engine) → the reason DoGraph refuses it (checked: refused at construction, message contains it).
REFUSED: dict[tuple[str, str], str] = {
    ("DataCollatorWithFlattening (packing)", "opacus"): "grad_engine='factored'",
}


# ------------------------------------------------------------------------------------------------ runs
@dataclass
class RunResult:
    params: torch.Tensor | None
    start: torch.Tensor | None
    losses: list
    trainer: object = None
    error: str | None = None


def _train(case: Case, kind: str, engine: str = "factored", num_domains: int = 1) -> RunResult:
    from transformers import Trainer, TrainingArguments

    from hf_dograph import DoGraphConfig, DoGraphTrainer

    model = case.model()
    start = torch.cat([p.detach().flatten().float().clone() for p in model.parameters()])
    ga = case.args.get("gradient_accumulation_steps", 1)
    common = dict(output_dir=tempfile.mkdtemp(prefix="compat-"), per_device_train_batch_size=BATCH // ga,
                  max_steps=STEPS, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", report_to="none",
                  save_strategy="no", logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True,
                  dataloader_num_workers=0, remove_unused_columns=False)
    common.update(case.args)
    if kind == "trainer":
        args = TrainingArguments(**common)
        cls = Trainer
    else:
        dograph = {"mixing_strategy": "uniform"} if kind == "uniform" else {
            "num_domains": num_domains, "grad_engine": engine, "domain_warmup_samples": 0, "projection_dim": 64,
            "domain_refit_steps": 1, "weight_smoothing": 1.0}
        if num_domains > 1:
            # 8 samples of history at random initialization: per-sample gradients are nearly orthogonal, K-means
            # isolates outliers and shrunk variances are all alike, so `uncertainty` stays ~uniform; `robust`
            # follows the domains' losses, which differ at once: the column shows the weights acting.
            dograph["objective"] = "robust"
        args = DoGraphConfig(**common, **dograph)
        cls = DoGraphTrainer
    collator = case.collator() if case.collator is not None else pad_collator
    data = Dataset.from_list(case.rows())
    trainer = cls(model=model, args=args, train_dataset=data, data_collator=collator)
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # logging_steps=1 with disable_tqdm: no log dict per step on stdout
    # The same data order for every trainer: sequential (the Trainer shuffles with its seed otherwise, also
    # the same; sequential keeps the test independent of that).
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(len(data)))
    if case.setup is not None:
        case.setup(trainer)
    trainer.train()
    params = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return RunResult(params=params, start=start, losses=losses, trainer=trainer)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run_case(case: Case) -> dict:
    """Every column of one row: {column: (ok, detail)}; raises nothing (failures are reported)."""
    out = {}
    reference = _train(case, "trainer")
    columns = [("uniform", "uniform", "factored")] + [(f"num_domains=1 ({e})", "dograph", e) for e in ENGINES]
    for column, kind, engine in columns:
        refused = REFUSED.get((case.name, engine)) if kind == "dograph" else None
        try:
            got = _train(case, kind, engine)
        except Exception as err:  # noqa: BLE001 - a failure or an expected refusal, reported either way
            if refused and refused in str(err):
                out[column] = ("refused", str(err).splitlines()[0])
            else:
                out[column] = (False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        if refused:
            out[column] = (False, f"expected a refusal ({refused}) but it trained")
            continue
        diff = relative_difference(got.params, reference.params)
        update = relative_difference(got.params - got.start, reference.params - reference.start)
        losses_ok = len(got.losses) == len(reference.losses) and all(
            math.isclose(a, b, rel_tol=case.loss_rtol) or (math.isnan(a) and math.isnan(b))
            for a, b in zip(got.losses, reference.losses))
        ok = diff <= case.param_rtol and losses_ok and math.isfinite(diff)
        out[column] = (ok, f"params {diff:.1e} (update {update:.1e}), losses {got.losses} vs {reference.losses}")
    # DoGraph with several domains: runs, and the weights it applies are not all 1.
    if REFUSED.get((case.name, "factored")):
        out["3 domains"] = ("refused", REFUSED[(case.name, "factored")])
    elif not case.domains_column:
        out["3 domains"] = ("n/a", "the first step overflows: nothing to weigh yet")
    else:
        try:
            got = _train(case, "dograph", "factored", num_domains=3)
            rec = got.trainer.dograph_last
            v = rec.multipliers[rec.assignments >= 0]
            moved = bool((v - 1).abs().max() > 1e-3)
            finite = bool(torch.isfinite(got.params).all())
            out["3 domains"] = (moved and finite, f"weights {v.tolist()}")
        except Exception as err:  # noqa: BLE001
            out["3 domains"] = (False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return out


COLUMNS = ["uniform"] + [f"num_domains=1 ({e})" for e in ENGINES] + ["3 domains"]


def render_table(results: dict[str, dict]) -> str:
    """The README's compatibility table from the matrix results."""
    lines = ["| feature / model | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for case in CASES:
        row = results[case.name]
        cells = []
        for col in COLUMNS:
            ok, _ = row[col]
            cells.append("refused¹" if ok == "refused" else "—" if ok == "n/a" else "✓" if ok else "✗")
        lines.append(f"| {case.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import os
    import sys

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    results = {}
    for case in CASES:
        results[case.name] = run_case(case)
        for col, (ok, detail) in results[case.name].items():
            print(f"{case.name:50s} {col:24s} {ok!s:8s} {detail[:150]}", file=sys.stderr)
    print(render_table(results))
