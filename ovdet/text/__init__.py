"""The text side: CLIP towers, prompt and class-file parsing, prompt limits, the embedding cache."""
