"""fimlora: choose each LoRA module's rank from the empirical Fisher of its LoRA-B gradient."""
