"""Launching: N local processes as one JAX cluster, TPU VM slices through gcloud, AOT planning."""
