#!/usr/bin/env python
"""Attention benchmark (same as `ascend-llm bench attention`)."""

import sys

from ascend_llm.bench.attention import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
