"""A student ready to serve: exported to what people serve with, checked and timed.

    formats.write("onnx-int8", model, tokenizer, out_dir, example)  # one artifact folder
    runtime.load("onnx-int8", out_dir, load_hf)  # (input_ids, attention_mask) -> .logits

Formats (`formats.FORMATS`): `bf16` (the Hugging Face folder with bfloat16 safetensors, loaded
by `AutoModel*` with its dtype), `onnx` (float32 graph for ONNX Runtime) and `onnx-int8`
(that graph with its matrix weights quantized to int8 by ONNX Runtime's dynamic quantizer).
The `export` stage (distill/stages/export.py) writes them and measures each against the
float32 model.
"""
