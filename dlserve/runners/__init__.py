"""ONNX Runtime runners, one per model: arrays in, arrays out (`run_batch`, `warm_up`)."""
