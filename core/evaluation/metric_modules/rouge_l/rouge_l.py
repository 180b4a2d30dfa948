"""ROUGE-L F-measure, shipped with Rank Studio so it loads offline by path.

Load it with `evaluate.load("/abs/path/to/core/evaluation/metric_modules/rouge_l")`.
evaluate's dependency scanner reads import lines literally, so keep one import per
line below.
"""
import re

import datasets
import evaluate
from nltk.stem import porter
from rouge_score import rouge_scorer

_DESCRIPTION = """\
ROUGE-L F-measure between each prediction and its reference, computed with the
`rouge_score` package (longest common subsequence of word tokens).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of strings, the model answers.
    references: list of strings, one reference per prediction.
    use_aggregator: True (default) returns the plain mean over items;
        False returns one score per item, in input order.
    use_stemmer: apply the Porter stemmer to tokens longer than 3 characters.
    tokenizer: "unicode" (default) keeps letters and digits of any script;
        "rouge_score" is the package's own tokenizer, which keeps only a-z and 0-9
        (so non-English text scores 0). Both lowercase, and on ASCII text they give
        the same tokens.
Returns:
    {"rougeL": float} or {"rougeL": list[float]}, each in [0, 1]. A pair where
    either side has no tokens (e.g. an empty answer) scores 0.
Examples:
    >>> m = evaluate.load("core/evaluation/metric_modules/rouge_l")
    >>> m.compute(predictions=["the cat sat"], references=["the cat sat"])
    {'rougeL': 1.0}
"""

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    publisher = "Association for Computational Linguistics",
    pages = "74--81",
}
"""

# Letters and digits of any script; `\w` minus the underscore so that, on ASCII
# text, the tokens equal rouge_score's [a-z0-9]+ tokens.
_WORD_RE = re.compile(r"[^\W_]+")


class _UnicodeTokenizer:
    """rouge_score tokenizer interface (`tokenize(text) -> list[str]`)."""

    def __init__(self, stemmer=None):
        self._stemmer = stemmer

    def tokenize(self, text):
        tokens = _WORD_RE.findall(text.lower())
        if self._stemmer is not None:
            # Same rule as rouge_score: only words longer than 3 characters are stemmed.
            tokens = [self._stemmer.stem(t) if len(t) > 3 else t for t in tokens]
        return tokens


def _make_scorer(use_stemmer, tokenizer):
    if tokenizer == "rouge_score":
        return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    if tokenizer == "unicode":
        # The same stemmer rouge_score builds for use_stemmer=True.
        stemmer = porter.PorterStemmer() if use_stemmer else None
        return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeTokenizer(stemmer))
    raise ValueError(f"tokenizer must be 'unicode' or 'rouge_score', got {tokenizer!r}")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string", id="sequence"),
                    "references": datasets.Value("string", id="sequence"),
                }
            ),
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, use_aggregator=True, use_stemmer=False, tokenizer="unicode"):
        scorer = _make_scorer(use_stemmer, tokenizer)
        scores = [
            float(scorer.score(ref, pred)["rougeL"].fmeasure)
            for pred, ref in zip(predictions, references)
        ]
        if use_aggregator:
            # Plain mean; confidence intervals are computed by core.evaluation.stats.
            return {"rougeL": sum(scores) / len(scores) if scores else float("nan")}
        return {"rougeL": scores}
