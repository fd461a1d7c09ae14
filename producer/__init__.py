"""DeepBatch producer side: reads prompt files, records jobs in Postgres, publishes work, exports results."""
