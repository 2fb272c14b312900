"""dlserve: train → export → serve for three deep-learning models.

This package holds the torch-free pieces that every stage shares: settings, data readers,
preprocessing, the model manifest, the model store and the ONNX Runtime session factory.
"""

__version__ = "0.1.0"
