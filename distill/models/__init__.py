"""Models: name resolution (built-in, local, hub, GGUF), safe loading (safetensors only), weight checks, saving."""
