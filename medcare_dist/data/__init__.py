"""Training data: chat-format files read and validated row by row, tokenized once into a per-run cache."""
