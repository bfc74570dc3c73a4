"""Engine integrations: kernelsel's selection and adapters behind an engine's own attention interface.

Each integration is a subpackage imported on demand (``selector.integrations.transformers``); importing
this package imports no engine, no torch.
"""
