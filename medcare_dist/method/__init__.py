"""The MedCare method: adapter layers, putting them into a model and folding them out, orthogonality."""
