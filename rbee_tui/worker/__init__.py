"""`rbee-worker`: one llama.cpp model behind HTTP. No UI imports here."""
