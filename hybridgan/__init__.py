"""hybridgan: face inpainting with a ResNet50 + U-Net hybrid discriminator, trained with Accelerate."""

__version__ = "0.1.0"
