"""Running one model across several machines with llama.cpp's RPC backend: model shapes and placement plans."""
