"""Adapters: one module per library, one class per (kernel, op contract).

Heavy libraries (torch, flashinfer, triton) are imported inside these modules
only, and only once an adapter is resolved from the manifest after selection.
"""
