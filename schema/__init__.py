"""DeepBatch's shared vocabulary: settings, file line formats, database tables."""
