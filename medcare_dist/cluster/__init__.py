"""Cluster-scale planning: memory, time and communication of a job before it is launched."""
