"""pipeline: a Keras 3 / TensorFlow transfer-learning pipeline for image classification."""
import logging
import os
import sys

# TensorFlow enables its oneDNN CPU kernels by default only on AVX512/AMX CPUs;
# on AVX2 CPUs they trained ResNet-20 1.4x faster here (BENCHMARKS.md), and the
# fused batch norm depends on them. Set before TensorFlow is imported; an
# explicit value in the environment still wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def verbosity_asked(argv) -> bool:
    """absl's --verbosity (or -v) >= 0 on the command line: the user wants INFO logs.

    Read from sys.argv because this runs on `import pipeline`, before any flag
    is parsed and before TensorFlow reads its log level (once, at its import).
    """
    for i, arg in enumerate(argv):
        name, eq, value = arg.lstrip("-").partition("=")
        if name in ("verbosity", "v") and arg.startswith("-"):
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
            try:
                return int(value) >= 0
            except ValueError:
                return False
    return False


# Our own output is ours: TensorFlow's INFO and WARNING lines (C++ and Python)
# are silenced unless --verbosity asks for them; TF_CPP_MIN_LOG_LEVEL set in the
# environment still wins. (Two lines TensorFlow's C++ absl logging prints before
# it is initialized, "All log messages before absl::InitializeLog()" and the
# cudart stub's, obey no setting.)
if not verbosity_asked(sys.argv[1:]):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)

__version__ = "0.1.0"
