"""The Triton Python-backend model (model.py) and its config.pbtxt template."""
