"""Ground floor: errors, atomic artefact writes, the `.tflite` and Keras/SavedModel readers, the one Keras import,
progress bars and native-output capture. Imports nothing else from tfcompress; every phase may import it."""
