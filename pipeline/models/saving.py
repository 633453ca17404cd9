"""Loading the `.keras` files the pipeline writes (checkpoints, `--init_from` sources)."""
import keras


def load_model(filename: str, *, compile: bool = False) -> keras.Model:
    """A `.keras` file of ours as a model: uncompiled unless asked (its optimizer may not matter).

    The pipeline's custom layers are registered by importing `pipeline.models`
    (which importing this module does). `safe_mode=False` because the files are
    the pipeline's own: their configs may hold layers Keras's safe mode refuses
    to deserialize.
    """
    return keras.saving.load_model(filename, compile=compile, safe_mode=False)
