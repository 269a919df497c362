"""Model directories: the one opener (`source.open_model`), Hugging Face import (`hf`) and export (`export`),
quantized layouts (`quantized`), tensor files (`safetensors_io`) and parameter names (`names`)."""
