"""tfcompress: compress a TensorFlow/Keras model into a verified TensorFlow Lite model.

The public API is re-exported here. Importing tfcompress sets TF_USE_LEGACY_KERAS=1 (tfmot needs Keras 2)
before TensorFlow loads.
"""

__version__ = "0.1.0"

from tfcompress import _keras  # noqa: F401,E402  (must run before anything imports TensorFlow)
from tfcompress.convert import ConvertConfig, Mode, convert  # noqa: E402
from tfcompress.errors import (  # noqa: E402
    CalibrationDataError,
    ConversionError,
    InputError,
    ModelLoadError,
    NotFullyQuantizedError,
    OutputPathError,
    TfcompressError,
    VerificationError,
)
from tfcompress.model_io import FloatModel, load_model  # noqa: E402
from tfcompress.pipeline import ConvertPipelineConfig, ConvertPipelineResult, run_convert  # noqa: E402
from tfcompress.prune import PruningCallback, SparsityNotReachedError, prune, sparsity, strip  # noqa: E402
from tfcompress.quantize import quantize_aware  # noqa: E402
from tfcompress.verify import VerificationResult, run_tflite, verify  # noqa: E402

__all__ = [
    "CalibrationDataError", "ConversionError", "ConvertConfig", "ConvertPipelineConfig",
    "ConvertPipelineResult", "FloatModel", "InputError", "Mode", "ModelLoadError",
    "NotFullyQuantizedError", "OutputPathError", "PruningCallback", "SparsityNotReachedError",
    "TfcompressError", "VerificationError", "VerificationResult", "convert", "load_model", "prune",
    "quantize_aware", "run_convert", "run_tflite", "sparsity", "strip", "verify",
]
