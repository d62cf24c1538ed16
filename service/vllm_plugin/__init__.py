"""The only code in alignlens that touches vLLM internals.

    plugin.py   entry point (`vllm.general_plugins`): registers the capture-enabled
                model classes with vLLM's ModelRegistry
    models.py   capture-enabled subclasses (Llama family, Qwen2, GPT-2) whose compiled
                forward also returns the residual stream at every depth
    capture.py  worker-side step state: maps captured rows to (request, index),
                joins sampled tokens, runs the probe, ships compact records
    worker.py   the `worker_extension_cls` whose named methods the server calls
                through `collective_rpc`

Pinned to vLLM 0.32.0: the row mapping reads the model runner's input batch.
See docs/design/capture.md for why capture is done this way.
"""
