"""The language model: loading and conversion, batched generation, sentence embeddings."""

