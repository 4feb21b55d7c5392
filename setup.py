"""Build the compiled World tokenizer; the rest of the package metadata lives in pyproject.toml.

The extension is optional: where no C compiler is available the install still
succeeds and `rwkv_train.tokenizer` falls back to its pure-Python encoder (and
says so with a warning).
"""

import sys

from setuptools import Extension, setup

# -O3 matters for the encoder's inner loop; MSVC spells optimisation differently and
# optimises release builds already.
extra_compile_args = [] if sys.platform == "win32" else ["-O3"]

setup(
    ext_modules=[
        Extension(
            "rwkv_train._world_tokenizer",
            sources=["csrc/world_tokenizer.c"],
            extra_compile_args=extra_compile_args,
            optional=True,
        )
    ]
)
