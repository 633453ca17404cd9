"""pipeline: a Keras 3 / TensorFlow transfer-learning pipeline for image classification."""
import os

# TensorFlow enables its oneDNN CPU kernels by default only on AVX512/AMX CPUs;
# on AVX2 CPUs they trained ResNet-20 1.4x faster here (BENCHMARKS.md), and the
# fused batch norm depends on them. Set before TensorFlow is imported; an
# explicit value in the environment still wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
