"""alignlens: vLLM serving with per-token weight-alignment attribution.

The distribution installs one namespace:
    alignlens.service   the process: gRPC server, engine hosting, vLLM plugin, CLI, Python client
    alignlens.probe     the science on plain tensors (never imports alignlens.service or grpc)
    alignlens.v1        gRPC code generated from protos/alignlens/v1 by the build (`make protos`)
"""

__version__ = "0.1.0"
