"""Evaluation: benchmark files, scoring, the model-side harness and CLI, general-ability retention."""
