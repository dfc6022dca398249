"""Per-layer runtime state and math: no graph, no model.

`layers` (the records and modules fxlora attaches under an adapted layer), `branch` (the LoRA
computation, written once), `ops` (the tensor functions it is built from), `gates` (the immutable
adapter state one call reads), `rows` (serving mixed batches), `delta` / `fold` /
`combine` (merging and combining adapters), `trainable` (which parameters train).
"""
