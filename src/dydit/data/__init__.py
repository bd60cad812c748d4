"""Datasets: Fashion-MNIST from IDX files, and ImageFolder trees for any other image set."""
from dydit.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST, default_fmnist_dir, load_fashion_mnist

__all__ = ["FashionMNIST", "load_fashion_mnist", "default_fmnist_dir", "FASHION_MNIST_CLASSES"]
