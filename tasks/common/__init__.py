"""Shared by every stage: model roles (one place builds chat models, components and agents), run
folders, JSONL files, content digests, shards, the ESConv reader, MLflow run look-ups."""
