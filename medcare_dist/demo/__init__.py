"""The embedded default: ICD-10-CM data and tokenizer, the tiny pretrained base, its held-out results."""
