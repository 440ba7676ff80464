"""Training: mesh, sharded state, train/eval steps, checkpoints, metrics, the loop."""
