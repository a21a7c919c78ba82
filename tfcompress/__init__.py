"""tfcompress: compress a TensorFlow/Keras model into a verified TensorFlow Lite model.

The public API is re-exported here. Importing tfcompress sets TF_USE_LEGACY_KERAS=1 (tfmot needs Keras 2)
before TensorFlow loads.
"""

__version__ = "0.1.0"

from tfcompress import _keras  # noqa: F401,E402  (must run before anything imports TensorFlow)
from tfcompress.cluster import cluster, distinct_values  # noqa: E402
from tfcompress.cluster import strip as strip_clustering  # noqa: E402
from tfcompress.convert import ConvertConfig, Mode, convert  # noqa: E402
from tfcompress.debug import QuantizationDebugResult, debug_quantization  # noqa: E402
from tfcompress.distill import Distiller  # noqa: E402
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
from tfcompress.export import ExportConfig, run_export  # noqa: E402
from tfcompress.factorize import FactorizeResult, LayerFactorization, factorize  # noqa: E402
from tfcompress.inspection import Inspection, inspect_tflite  # noqa: E402
from tfcompress.macs import MacCount, count_macs  # noqa: E402
from tfcompress.model_io import FloatModel, load_model  # noqa: E402
from tfcompress.pipeline import ConvertPipelineConfig, ConvertPipelineResult, run_convert  # noqa: E402
from tfcompress.prune import PruningCallback, SparsityNotReachedError, prune, sparsity, strip  # noqa: E402
from tfcompress.quantize import quantize_aware  # noqa: E402
from tfcompress.verify import VerificationResult, run_tflite, verify  # noqa: E402

__all__ = [
    "CalibrationDataError", "ConversionError", "ConvertConfig", "ConvertPipelineConfig",
    "ConvertPipelineResult", "Distiller", "ExportConfig", "FactorizeResult", "FloatModel", "InputError",
    "Inspection", "LayerFactorization", "MacCount", "Mode", "ModelLoadError", "NotFullyQuantizedError",
    "OutputPathError", "PruningCallback", "QuantizationDebugResult", "SparsityNotReachedError",
    "TfcompressError", "VerificationError", "VerificationResult", "cluster", "convert", "count_macs",
    "debug_quantization", "distinct_values", "factorize", "inspect_tflite", "load_model", "prune",
    "quantize_aware", "run_convert", "run_export", "run_tflite", "sparsity", "strip", "strip_clustering",
    "verify",
]
