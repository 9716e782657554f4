"""The paper's published numbers (Shi, Holtz & Mishne, ICLR 2021, Tables 1-2), which the results page and the
RobustBench-style model_info set beside ours. Data only: the modules that compare against them import this one.
"""

from __future__ import annotations

PAPER_COLUMNS = ("fgsm", "pgd", "cw", "df")

# Paper Tables 1-2 (soap-reference §5): No attack, FGSM, PGD, CW, DeepFool.
PAPER: dict[tuple[str, str, str], tuple[float, ...]] = {
    ("mnist-fcn", "vanilla", "none"): (98.10, 16.87, 0.49, 0.01, 1.40),
    ("mnist-fcn", "fgsm-at", "none"): (79.76, 80.57, 2.95, 6.22, 17.24),
    ("mnist-fcn", "pgd-at", "none"): (76.82, 60.70, 57.07, 31.68, 13.82),
    ("mnist-fcn", "soap", "none"): (97.57, 29.15, 0.58, 0.25, 2.32),
    ("mnist-fcn", "soap", "min-aux"): (97.56, 66.85, 61.88, 86.81, 87.02),
    ("mnist-fcn", "soap", "oracle"): (98.93, 69.21, 64.76, 97.88, 97.97),
    ("mnist-cnn", "vanilla", "none"): (99.15, 1.49, 0.00, 0.00, 0.69),
    ("mnist-cnn", "fgsm-at", "none"): (98.78, 99.50, 33.70, 0.02, 6.16),
    ("mnist-cnn", "pgd-at", "none"): (98.97, 96.38, 93.22, 90.31, 75.55),
    ("mnist-cnn", "soap", "none"): (99.04, 65.35, 27.54, 0.35, 0.69),
    ("mnist-cnn", "soap", "min-aux"): (98.94, 87.78, 84.92, 74.61, 81.27),
    ("mnist-cnn", "soap", "oracle"): (99.42, 89.40, 86.62, 98.44, 98.47),
    ("cifar10-resnet18", "vanilla", "none"): (90.54, 15.42, 0.00, 0.00, 6.26),
    ("cifar10-resnet18", "fgsm-at", "none"): (72.73, 44.16, 37.40, 2.69, 24.58),
    ("cifar10-resnet18", "pgd-at", "none"): (74.23, 47.43, 42.11, 3.14, 25.84),
    ("cifar10-resnet18-rp", "soap", "none"): (73.64, 5.77, 0.47, 0.00, 13.65),
    ("cifar10-resnet18-rp", "soap", "min-aux"): (71.97, 35.80, 38.53, 68.22, 68.44),
    ("cifar10-resnet18-rp", "soap", "oracle"): (87.57, 37.60, 39.40, 79.80, 84.34),
    ("cifar10-resnet18-lc", "soap", "none"): (86.36, 22.81, 0.15, 0.00, 8.52),
    ("cifar10-resnet18-lc", "soap", "min-aux"): (84.07, 51.02, 51.42, 73.95, 74.79),
    ("cifar10-resnet18-lc", "soap", "oracle"): (94.06, 59.45, 62.29, 86.94, 88.88),
}


def paper_key(network: str, recipe: str) -> str:
    """Table key of a network: MNIST rows are per architecture; CIFAR SOAP rows per auxiliary task."""
    if network.startswith("mnist"):
        return network.rsplit("-", 1)[0]  # mnist-fcn-dr -> mnist-fcn
    if recipe != "soap":
        return network.rsplit("-", 1)[0]  # cifar10-resnet18-lc -> cifar10-resnet18
    return network
