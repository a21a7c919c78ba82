"""tfcompress: compress a TensorFlow/Keras model into a verified TensorFlow Lite model.

The public API is re-exported here. Importing tfcompress sets TF_USE_LEGACY_KERAS=1 (tfmot needs Keras 2)
before TensorFlow loads, unless it is set already: so `tf.keras` is tf_keras in the importing process, unless
TF_USE_LEGACY_KERAS=0 was set (then it stays Keras 3). `import keras` is Keras 3 either way; tfcompress takes
models from both.

The library is in sub-packages by phase, each importing only from the floors below it (the contract is
declared in `.importlinter` and checked by the tests):

    runs                                 the convert and optimize runs, their configs, the demo
    targets | analysis                   deployment (micro, export, vela) | report, inspection, macs, latency, debug
    training | conversion | models       prune, channel pruning, cluster, QAT, distill, factorize |
                                         convert, verify, calibration | the reference models (LeNet-5)
    core                                 errors, artefacts, the flatbuffer and model readers, the Keras import,
                                         progress, native-output capture
"""

from tfcompress.core import _keras  # first: must run before anything imports TensorFlow
from tfcompress.core.version import __version__
from tfcompress.training.cluster import cluster, distinct_values
from tfcompress.training.cluster import strip as strip_clustering
from tfcompress.conversion.convert import ConvertConfig, Mode, convert
from tfcompress.analysis.debug import QuantizationDebugResult, debug_quantization
from tfcompress.training.distill import Distiller
from tfcompress.core.errors import (
    CalibrationDataError,
    ConversionError,
    InputError,
    ModelLoadError,
    NotFullyQuantizedError,
    OutputPathError,
    TfcompressError,
    VerificationError,
)
from tfcompress.targets.export import ExportConfig, run_export
from tfcompress.training.factorize import FactorizeResult, LayerFactorization, factorize
from tfcompress.analysis.inspection import Inspection, inspect_tflite
from tfcompress.analysis.macs import MacCount, count_macs
from tfcompress.core.model_io import FloatModel, load_model
from tfcompress.core.keras3 import Keras3Error, Translation, to_keras3, to_tf_keras
from tfcompress.runs.pipeline import ConvertPipelineConfig, ConvertPipelineResult, run_convert
from tfcompress.training.channel_prune import ChannelPruneResult, LayerChannels, prune_channels
from tfcompress.analysis.sensitivity import SensitivityResult, sensitivity, solve_ratios
from tfcompress.training.prune import PruningCallback, SparsityNotReachedError, prune, sparsity, strip
from tfcompress.training.quantize import quantize_aware
from tfcompress.conversion.verify import VerificationResult, run_tflite, verify
# Modules the README uses by name (`from tfcompress import calibration`, `tfcompress.tflite_model...`).
from tfcompress.conversion import calibration, datasets
from tfcompress.core import tflite_model
from tfcompress.analysis import latency
from tfcompress.core import quantizers
from tfcompress.analysis.quantization_error import QuantizationErrorResult, quantization_error

_keras.restore_user_choice()  # tfmot's import set TF_USE_LEGACY_KERAS=1; a user's own value is put back

__all__ = [
    "__version__", "calibration", "datasets", "latency", "tflite_model",
    "quantizers", "quantization_error", "QuantizationErrorResult",
    "CalibrationDataError", "ConversionError", "ConvertConfig", "ConvertPipelineConfig",
    "ConvertPipelineResult", "Distiller", "ExportConfig", "FactorizeResult", "FloatModel", "InputError",
    "Inspection", "Keras3Error", "LayerFactorization", "MacCount", "Mode", "ModelLoadError", "NotFullyQuantizedError",
    "OutputPathError", "PruningCallback", "QuantizationDebugResult", "SparsityNotReachedError",
    "TfcompressError", "Translation", "VerificationError", "VerificationResult", "cluster", "convert", "count_macs",
    "debug_quantization", "distinct_values", "factorize", "inspect_tflite", "load_model", "prune",
    "quantize_aware", "run_convert", "run_export", "run_tflite", "sparsity", "strip", "strip_clustering",
    "to_keras3", "to_tf_keras", "verify",
    "ChannelPruneResult", "LayerChannels", "prune_channels", "SensitivityResult", "sensitivity", "solve_ratios",
]
