"""What keeps a run's files trustworthy: digests of published artefacts, the output_dir lock."""
