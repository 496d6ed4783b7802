"""The gateway: one OpenAI-compatible endpoint for every pool's workers (`rbee-tui gateway`, docs/gateway.md)."""
