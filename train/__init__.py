"""Everything distributed: process groups, DeepSpeed engine, checkpoints, metrics, the loop."""
