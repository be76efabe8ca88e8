"""The inference backend: the HydraHead model, the paged KV cache, the engine and its HTTP API."""
