"""Training: config.py (YAML -> dataclasses), batches.py, losses.py (the CV-VAE objective), discriminator.py
(3D PatchGAN), checkpoints.py (save, resume), trainer.py (the loop). LPIPS is in `cvvae.eval.lpips`."""
