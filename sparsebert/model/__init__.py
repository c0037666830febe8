"""The model: attention patterns and DAM masks, the backends that apply them, and transformers' BERT with a mask
source. Depends on torch and transformers only (and the base modules' names): what a saved model needs to run."""
