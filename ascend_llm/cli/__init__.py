"""Command-line interface (`ascend-llm`)."""
