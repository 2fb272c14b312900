"""dlserve's torch-free core: everything the serving image carries besides service/.

Settings, the model registry and each model's contract (models/), the ONNX Runtime
runners (runners/) and their one session factory (runtime.py), the one image
preprocessing, tokenizer and rating encoding (preprocess/), the model manifest and the
model store. It imports nothing from training/, export/, readers/, evaluation/, the CLI
or the bench.
"""

__version__ = "0.1.0"
