"""One module per model: its registry entry (`MODEL`, a `dlserve.registry.ModelSpec`) and
the HTTP contract of its routes (the request and response types they really parse and
return, and the checks that turn a request into the runner's input)."""
