"""The user-facing model: `LoraModel` (a façade, `lora_model`) over one `AdapterState` (`state`),
with the operations it delegates to: adding and switching adapters (`adapters`), merging
(`merging`), loading and saving (`loading`), mixed batches (`mixed_batch`) and `transform`."""
