"""Corpora to training batches: reading text/JSONL corpora, token shards, batch makers."""
