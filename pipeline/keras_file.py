"""Write a model's `.keras` file with its weights streamed through the disk instead of memory.

Why: `model.save("x.keras")` builds the weights' `model.weights.h5` in an
`io.BytesIO` before putting it in the zip (Keras does so whenever its
`is_memory_sufficient` check passes, i.e. almost always), and then copies the
buffer once more (`getvalue()`). For BiT-R50x1 with its SGD momentum that is
+180-245 MB of malloc memory on top of TensorFlow's pool, at every epoch's
checkpoint: the highest point of the whole run (BENCHMARKS.md, "Where a BiT
step's memory goes"). Here the public `model.save(directory, zipped=False)`
writes the same members (`config.json`, `metadata.json`, `model.weights.h5`,
`assets/`) as files, h5py writing the weights straight to disk, and the zip is
assembled from them in chunks: the same `.keras` file, loaded by
`keras.saving.load_model` as any other (`tests/test_keras_file.py`), for a
rise of +46 MB instead of +245 MB. The unzipped members are Keras's documented `.keras`
layout, the one `zipped=False` itself writes; the test round-trips a model to
catch a Keras release where they would part.

`_cache_skipsets` works around a Keras bug (seen in Keras 3.15):
`saving_lib.get_attr_skipset` caches each object type's skip set under
"saving_attr_skipset_<type>" but looks it up under "saving_attr_skiplist_<type>",
so every layer, optimizer and metric visited by a save or a load builds a
throw-away `Layer()` (or `Optimizer`, `Metric`, ...) to list its attributes:
~190 of them per BiT checkpoint. Storing the computed sets under the key the
lookup reads makes those calls cache hits. It is the one place the pipeline
reaches into Keras's private modules; `tests/test_keras_file.py` fails when
Keras renames them or fixes the key (then drop the adapter).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile

# Every object type `get_attr_skipset` knows.
SKIPSET_TYPES = ("Operation", "Layer", "Functional", "Sequential", "Metric", "Optimizer", "Loss", "Cross",
                 "Feature")


def _cache_skipsets() -> None:
    """Store each type's skip set under the key Keras's lookup reads (see the module docstring).

    Cheap after the first call; repeated because `keras.backend.clear_session` clears Keras's global state.
    """
    from keras.src.backend.common import global_state
    from keras.src.saving import saving_lib

    for obj_type in SKIPSET_TYPES:
        key = f"saving_attr_skiplist_{obj_type}"
        if global_state.get_global_attribute(key, None) is None:
            global_state.set_global_attribute(key, saving_lib.get_attr_skipset(obj_type))


def save_keras(model, filename: str) -> None:
    """`model.save(filename)` (a zipped `.keras` file, optimizer included), through a temporary directory.

    The directory is made beside `filename` (same file system, removed in
    every case), so the weights are written once to disk and read back from
    the page cache.
    """
    directory = tempfile.mkdtemp(prefix=".tmp-keras-", dir=os.path.dirname(os.path.abspath(filename)))
    try:
        _cache_skipsets()
        members = os.path.join(directory, "model")
        model.save(members, zipped=False)
        with zipfile.ZipFile(filename, "w") as archive:  # stored, as Keras writes it
            for root, _, files in os.walk(members):
                for name in sorted(files):
                    path = os.path.join(root, name)
                    archive.write(path, os.path.relpath(path, members))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
