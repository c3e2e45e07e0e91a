"""Work done inside an actor: load, quantize, evaluate, profile. Never imports Ray."""
