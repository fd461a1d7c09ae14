"""DeepBatch worker: the Celery adapter, the feeder and recorder, the state transitions and the inference engine."""
