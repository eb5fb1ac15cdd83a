from .autoencoder import CVVAE, DiagonalGaussian, Decoder3D, Encoder3D

__all__ = ["CVVAE", "DiagonalGaussian", "Decoder3D", "Encoder3D"]
