"""Helpers for pass tests: a transformed model's root and a fresh base graph with saved modules
swapped and branches inserted (and the adapted layers' calls asking for their base output, as
`fxlora.passes.rewrite` does)."""

from fxlora.passes import insert_lora, mark_base_calls, swap_saved_modules
from fxlora.tracing.call_keys import canonical_key
from fxlora.tracing.traced import trace_through_ids, trace_variant


def base_graph(lora):
    root = lora.model
    interesting = [root.get_submodule(n) for n in lora.targeted_module_names]
    graph = trace_variant(root, trace_through_ids(root, interesting), canonical_key(root, True)).graph
    swap_saved_modules(graph, root)
    insert_lora(graph, root)
    mark_base_calls(graph, root)
    return root, graph
