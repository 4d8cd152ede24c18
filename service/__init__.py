"""faceset service: HTTP API over the engines. Never imports torch."""
