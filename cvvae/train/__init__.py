"""Training: the CV-VAE objective, LPIPS, the 3D discriminator and the training loop."""
