"""Per-domain validation loss and perplexity.

The loss of a domain is the sum of its tokens' next-token cross-entropies divided by its
number of predicted tokens (a token-mean, as the Trainer's loss, but per domain): with a
causal shift, position t predicts token t+1, and labels of -100 (padding) count nowhere.
Sums are taken in float64 so the result does not depend on the batch size. The same measure ships as an
`evaluate` metric module (`per_domain_perplexity_path`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

#: What `hf-dograph train` writes beside a run: {"per_domain": `PerDomainResult.to_dict()`, "data": ...}.
PER_DOMAIN_FILE = "per_domain_eval.json"


def per_domain_perplexity_path() -> Path:
    """Folder of the `evaluate` module shipped in the package: `evaluate.load(str(per_domain_perplexity_path()))`."""
    return Path(__file__).resolve().parents[1] / "metrics" / "per_domain_perplexity"


@dataclass
class PerDomainResult:
    """Validation results per human domain.

    loss[i], perplexity[i], tokens[i] belong to `domain_names[i]`; a domain with no
    validation token has loss NaN. `mean_loss` is the unweighted mean over domains with data
    (each domain counts once, however large: the quantity DoGraph balances), `mean_perplexity`
    the mean of their perplexities, `overall_loss` the token-mean over all tokens (what the
    Trainer's eval_loss estimates), and `worst_domain` the domain with the highest loss.
    """

    domain_names: list[str]
    loss: list[float]
    tokens: list[int]

    @property
    def perplexity(self) -> list[float]:
        return [math.exp(x) if not math.isnan(x) else float("nan") for x in self.loss]

    def _measured(self) -> list[int]:
        return [i for i, n in enumerate(self.tokens) if n > 0]

    @property
    def mean_loss(self) -> float:
        idx = self._measured()
        return sum(self.loss[i] for i in idx) / len(idx) if idx else float("nan")

    @property
    def mean_perplexity(self) -> float:
        idx = self._measured()
        ppl = self.perplexity
        return sum(ppl[i] for i in idx) / len(idx) if idx else float("nan")

    @property
    def overall_loss(self) -> float:
        total = sum(self.tokens)
        return sum(self.loss[i] * self.tokens[i] for i in self._measured()) / total if total else float("nan")

    @property
    def worst_domain(self) -> str | None:
        idx = self._measured()
        return self.domain_names[max(idx, key=lambda i: self.loss[i])] if idx else None

    def to_dict(self) -> dict:
        ppl = self.perplexity
        return {
            "domains": {
                name: {"loss": self.loss[i], "perplexity": ppl[i], "tokens": self.tokens[i]}
                for i, name in enumerate(self.domain_names)
            },
            "mean_loss": self.mean_loss,
            "mean_perplexity": self.mean_perplexity,
            "overall_loss": self.overall_loss,
            "overall_perplexity": math.exp(self.overall_loss) if self._measured() else float("nan"),
            "worst_domain": self.worst_domain,
        }

    def save(self, path) -> None:
        """Write `to_dict()` as strict JSON (a domain without tokens has loss and perplexity null)."""
        from ..jsonfiles import write_json

        write_json(path, self.to_dict())

    def to_table(self, title: str | None = None) -> str:
        """A plain-text table: one row per domain, then the mean over domains and the worst one."""
        return compare_table({title or "model": self})


def compare_table(results: dict[str, PerDomainResult], reference: str | None = None) -> str:
    """Plain-text side-by-side table of several results over the same domains.

    With two or more results, the last columns give the change in loss of the first result
    relative to `reference` (default: the second one): negative is better.
    """
    items = list(results.items())
    names = items[0][1].domain_names
    width = max([len("domain"), len("mean over domains")] + [len(n) for n in names])
    header = f"{'domain':<{width}} {'tokens':>9}"
    for label, _ in items:
        header += f" | {label[:22]:>22}"
    ref_label = None
    if len(items) >= 2:
        ref_label = reference or items[1][0]
        header += f" | {'Δ loss':>10}"
    sub = f"{'':<{width}} {'':>9}" + "".join(f" | {'loss':>10} {'ppl':>11}" for _ in items)
    if ref_label:
        sub += f" | {'vs ' + ref_label[:7]:>10}"
    rule = "-" * len(sub)
    lines = [header, sub, rule]

    def row(label, tokens, losses, ppls):
        line = f"{label:<{width}} {tokens:>9}"
        for lo, pp in zip(losses, ppls):
            line += f" | {lo:>10.4f} {pp:>11.3f}"
        if ref_label:
            ref_i = [k for k, _ in items].index(ref_label)
            line += f" | {losses[0] - losses[ref_i]:>+10.4f}"
        return line

    for i, name in enumerate(names):
        lines.append(row(name, items[0][1].tokens[i], [r.loss[i] for _, r in items], [r.perplexity[i] for _, r in items]))
    lines.append(rule)
    lines.append(row("mean over domains", sum(items[0][1].tokens), [r.mean_loss for _, r in items],
                     [r.mean_perplexity for _, r in items]))
    lines.append(row("all tokens", sum(items[0][1].tokens), [r.overall_loss for _, r in items],
                     [math.exp(r.overall_loss) for _, r in items]))
    worst = "worst domain".ljust(width) + " " * 10 + "".join(f" | {str(r.worst_domain)[:22]:>22}" for _, r in items)
    lines.append(worst)
    return "\n".join(lines)


@torch.no_grad()
def evaluate_per_domain(
    model,
    dataset,
    collator,
    domain_names: Sequence[str],
    batch_size: int = 8,
    domain_key: str = "domain",
    device: torch.device | str | None = None,
) -> PerDomainResult:
    """Per-domain token-mean validation loss of a causal LM.

    `dataset` yields features with `input_ids` and `domain_key`; `collator` (a
    `DomainCollator` with keep_domain=True) batches them. The model is put in eval mode for
    the pass and back in its former mode after it.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    d = len(domain_names)
    loss_sum = torch.zeros(d, dtype=torch.float64)
    count = torch.zeros(d, dtype=torch.long)
    try:
        features: list = []
        for feature in dataset:
            features.append(feature)
            if len(features) == batch_size:
                _accumulate(model, collator(features), domain_key, device, loss_sum, count)
                features = []
        if features:
            _accumulate(model, collator(features), domain_key, device, loss_sum, count)
    finally:
        model.train(was_training)
    loss = [(loss_sum[i] / count[i]).item() if count[i] > 0 else float("nan") for i in range(d)]
    return PerDomainResult(list(domain_names), loss, count.tolist())


def _accumulate(model, batch, domain_key, device, loss_sum, count) -> None:
    domains = batch.pop(domain_key).to(torch.long)
    labels = batch.pop("labels")
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(device)
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    valid = shift_labels != -100
    per_seq_sum = (token_loss.double() * valid).sum(dim=1).cpu()
    per_seq_n = valid.sum(dim=1).cpu()
    loss_sum.index_add_(0, domains, per_seq_sum)
    count.index_add_(0, domains, per_seq_n)
