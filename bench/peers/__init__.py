"""The servers `dlserve bench` measures dlserve against, each with the same models (the
registry's runners, so the same preprocessing and the same ONNX Runtime sessions) and the
same worker count; only the serving layer differs, which is what the benchmark compares.

- naive.py: FastAPI + pydantic, one model run per request (the usual tutorial server);
- lean.py: Starlette + orjson + one model run per request (a performance-minded engineer's
  hand-written server);
- ceiling.py: Starlette that parses the JSON and answers without running a model (the
  HTTP ceiling of this machine);
- bentoml_batchable.py: BentoML's own `batchable=True` API, its defaults;
- litserve_peer.py: LitServe with its batching (max_batch_size 64).
"""
