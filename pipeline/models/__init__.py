"""Model families. Importing this package registers every model."""
from pipeline.models.registry import (create_model, get_spec, is_valid_model_name,  # noqa: F401
                                      list_models, list_prefixes, register_model, weights_provenance)
from pipeline.models import resnet_cifar, resnet  # noqa: F401,E402
from pipeline.models import bit, pretrained  # noqa: F401,E402
from pipeline.models import keras_hub  # noqa: F401,E402  (the family; keras_hub itself loads lazily)
from pipeline.models import keras_apps  # noqa: F401,E402
from pipeline.models.saving import load_model  # noqa: F401,E402
