"""apogee: PyTorch-native training of very large language models that survives hardware failure."""

__version__ = "0.1.0"
