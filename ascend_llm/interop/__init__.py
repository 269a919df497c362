"""Hugging Face interop: import (`hf.load`, `hf.load_pretrained`) and export (`export.export_hf`)."""
