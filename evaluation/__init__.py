"""`dlserve eval`: each stored model measured through ONNX Runtime on held-out data it never
trained on, with the same runner the service uses. Torch-free; not part of the serving
image (it reads the data sets)."""
