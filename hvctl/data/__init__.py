"""Datasets: the JSONL manifest every stage reads and writes, and aspect/duration buckets."""
