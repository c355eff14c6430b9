"""Interoperability with the authors' PyTorch (GPT-NeoX) checkpoints: torch-free file formats and name mapping."""
