"""Write scikit-learn's handwritten digits as an image-caption set (no download): see
ascend_llm.data.images.write_digits_dataset. Usage: python scripts/make_digit_captions.py OUT_DIR"""

import sys

from ascend_llm.data.images import write_digits_dataset

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write_digits_dataset(sys.argv[1]))
