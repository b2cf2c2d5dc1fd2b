"""Stage 1, ingest: Pushshift dumps of Reddit to threads.parquet, and the sample dump the demo ingests."""
