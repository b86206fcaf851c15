"""Training: batching and packed attention, graphed forward, schedule, checkpoints, throughput, the loop."""
