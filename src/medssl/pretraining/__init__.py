"""Self-supervised pre-training: the shared loop, optimisers, augmentation, DDP and the methods."""
