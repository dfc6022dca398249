"""Files: PEFT's adapter format (`peft_format`), adapter directories (`adapter_files`), merged
weights (`export`) and atomic writes (`atomic`). Nothing here imports `fxlora.model`."""
