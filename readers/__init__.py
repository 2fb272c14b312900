"""The data sets, as published: MNIST (IDX), SST-2 (GLUE TSV) and MovieLens (100K or the
newer CSV releases), read with numpy and the standard library, downloaded from their
official sources with checksum verification when missing. Torch-free; used by training,
evaluation and the bench, never by the service."""
