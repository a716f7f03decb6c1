"""`per_domain_perplexity`: an `evaluate` metric for per-domain perplexity of a language model.

Shipped inside hf_dograph and loaded by local path, so nothing is fetched::

    import evaluate
    from hf_dograph.evaluation import per_domain_perplexity_path

    metric = evaluate.load(str(per_domain_perplexity_path()))
    metric.compute(token_losses=[[2.1, 1.7], [0.3]], domains=["web", "code"])

Each example is one sequence: `token_losses` are the next-token negative log-likelihoods (nats) of its
predicted tokens (padding left out), `domains` its human domain label (string or int). A domain's loss
is the sum of its tokens' losses over its number of tokens (a token mean, the same as the Trainer's
loss but per domain, as `hf_dograph.evaluation.evaluate_per_domain` computes it); its perplexity is
exp(loss). `mean_*` averages over domains, each counted once; `worst_domain` has the highest loss;
`overall_*` is the token mean over all tokens.

Self-contained on purpose: `evaluate` copies this file into its module cache and imports it from there.
"""

import math

import datasets
import evaluate

_DESCRIPTION = """Per-domain loss and perplexity from per-token losses (or log-probabilities) and a domain label per
sequence, with the mean over domains (each domain counted once) and the worst domain."""

_KWARGS_DESCRIPTION = """
Args:
    token_losses (`list` of `list` of `float`): per sequence, the negative log-likelihood (natural log) of each
        predicted token; with `log_probs=True`, their log-probabilities instead.
    domains (`list` of `str` or `int`): the domain label of each sequence.
    log_probs (`bool`, defaults to False): the inputs are log-probabilities (losses are their negation).
    domain_names (`list` of `str`, optional): report the domains in this order and under these names; with int
        labels, label i is named domain_names[i]. A listed domain with no token gets loss NaN.
Returns:
    domains: {name: {"loss", "perplexity", "tokens"}}; mean_loss, mean_perplexity (over domains with tokens);
    worst_domain, worst_loss, worst_perplexity; overall_loss, overall_perplexity (token mean over everything).
Example:
    >>> metric.compute(token_losses=[[1.0, 3.0], [2.0]], domains=["a", "b"])["domains"]["a"]["loss"]
    2.0
"""

_CITATION = """@article{dograph2026,
  title   = {Rethinking Data Mixing from the Perspective of Large Language Models},
  journal = {arXiv preprint arXiv:2604.07963},
  year    = {2026}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PerDomainPerplexity(evaluate.Metric):
    def _info(self):
        losses = datasets.Sequence(datasets.Value("float64"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Two accepted input shapes: string labels or integer labels.
            features=[
                datasets.Features({"token_losses": losses, "domains": datasets.Value("string")}),
                datasets.Features({"token_losses": losses, "domains": datasets.Value("int64")}),
            ],
            reference_urls=["https://arxiv.org/abs/2604.07963"],
        )

    def _compute(self, token_losses, domains, log_probs=False, domain_names=None):
        sign = -1.0 if log_probs else 1.0
        sums, counts = {}, {}
        for losses, domain in zip(token_losses, domains):
            if domain_names is not None and isinstance(domain, int):
                domain = domain_names[domain]
            key = str(domain)
            # math.fsum: an exact sum, so the result does not depend on how sequences were batched.
            sums[key] = sums.get(key, 0.0) + math.fsum(sign * float(x) for x in losses)
            counts[key] = counts.get(key, 0) + len(losses)
        # Default order: integer labels numerically (2 before 10), other labels alphabetically.
        names = ([str(n) for n in domain_names] if domain_names is not None
                 else sorted(sums, key=lambda s: (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)))
        per_domain = {}
        for name in names:
            n = counts.get(name, 0)
            loss = sums[name] / n if n else float("nan")
            per_domain[name] = {"loss": loss, "perplexity": math.exp(loss) if n else float("nan"), "tokens": n}
        measured = [name for name in names if per_domain[name]["tokens"] > 0]
        total = sum(counts.values())
        result = {"domains": per_domain}
        if measured:
            worst = max(measured, key=lambda name: per_domain[name]["loss"])
            overall = math.fsum(sums.values()) / total
            result.update(
                mean_loss=sum(per_domain[n]["loss"] for n in measured) / len(measured),
                mean_perplexity=sum(per_domain[n]["perplexity"] for n in measured) / len(measured),
                worst_domain=worst,
                worst_loss=per_domain[worst]["loss"],
                worst_perplexity=per_domain[worst]["perplexity"],
                overall_loss=overall,
                overall_perplexity=math.exp(overall),
            )
        return result
