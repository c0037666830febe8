"""Sharing a trained model: the model card of an export folder and its upload to the Hugging Face Hub. The folder
itself (weights, config, tokenizer, the model code) is written by ``save_pretrained(dir, standalone=True)``."""
