#!/usr/bin/env python
"""Training throughput benchmark (same as `ascend-llm bench train`)."""

import sys

from ascend_llm.bench.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
