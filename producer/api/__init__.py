"""The HTTP API: the OpenAI Batch API (files, batches) with API keys, and the job dashboard."""
