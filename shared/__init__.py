"""What two or more servers use: config, embeddings, stores, retrieval, telemetry, LLM routing."""
