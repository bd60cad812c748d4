"""Datasets: Fashion-MNIST from IDX files, Moving Fashion-MNIST videos, ImageFolder trees for any other image set, cached VAE latents."""
from dydit.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST, default_fmnist_dir, load_fashion_mnist
from dydit.data.image_folder import ImageFolder, center_crop_arr, is_image_folder
from dydit.data.latents import LatentCache
from dydit.data.moving_fmnist import MovingFashionMNIST

__all__ = ["FashionMNIST", "load_fashion_mnist", "default_fmnist_dir", "FASHION_MNIST_CLASSES",
           "ImageFolder", "center_crop_arr", "is_image_folder", "LatentCache", "MovingFashionMNIST"]
