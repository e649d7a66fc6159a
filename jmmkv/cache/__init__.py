"""The KV cache, budgets and compression policies."""
