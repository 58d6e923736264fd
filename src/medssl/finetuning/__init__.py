"""Fine-tuning: the loop, task types, protocols, test-time augmentation and metrics."""
