"""Input pipeline: corpora, vocabularies, preprocessors, the seqio task registry and batching."""
