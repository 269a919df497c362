"""Model evaluation: perplexity with strided sliding windows, over any model source."""
