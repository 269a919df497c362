"""Mixed-precision benchmark (fp32, bf16, fp16, fp8, fp8_dynamic on the tiny model); see ascend_llm/bench/precision.py.

  python scripts/bench_precision.py [--steps 300] [--engine auto|trainer|builtin] [overrides ...]
"""

import sys

from ascend_llm.bench.precision import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
