"""Model backends: transformers (default), and later vLLM and OpenAI-compatible servers."""
