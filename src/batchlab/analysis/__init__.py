"""Store rows -> plain tables; never draws, never writes."""
