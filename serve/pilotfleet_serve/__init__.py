"""`pilotfleet serve`: a complete fleet on one machine, and the Hugging Face causal-LM Triton backend."""
