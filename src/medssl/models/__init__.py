"""Networks and weights: backbones, encoder files, the U-Net, published checkpoint formats."""
