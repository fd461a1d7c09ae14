"""DeepBatch worker: the Celery adapter, the state store and the inference engine."""
