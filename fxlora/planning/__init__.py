"""Deciding what to adapt and how, before anything changes: `matching` (PEFT's target rules),
`defaults` (default targets per transformers model type), `plan` (targets, graph roots and paths)
and `explain` (the dry-run report)."""
