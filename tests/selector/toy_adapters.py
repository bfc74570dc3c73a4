"""Adapters of the toy manifest (``toy_manifest.yaml``): each imports one stand-in library and does nothing else.

The ``toy`` fixture puts the stand-ins in ``sys.modules``; a test breaks one (``break_import``) to make
exactly the kernels that use it unavailable, with no torch or GPU library involved.
"""

from __future__ import annotations

from registry.adapters.base import Adapter


class FastDecode(Adapter):
    op = "mha_decode"
    libraries = ("toy_fast",)


class LayoutDecode(Adapter):
    op = "mha_decode"
    libraries = ("toy_layout",)


class PortableDecode(Adapter):
    op = "mha_decode"
    libraries = ("toy_portable",)


class ReferenceDecode(Adapter):
    op = "mha_decode"
    libraries = ("toy_reference",)


class FastMLA(Adapter):
    op = "mla_decode"
    libraries = ("toy_fast",)


class PortableMLA(Adapter):
    op = "mla_decode"
    libraries = ("toy_portable",)


class ReferenceMLA(Adapter):
    op = "mla_decode"
    libraries = ("toy_reference",)


class FastExtend(Adapter):
    op = "mha_extend"
    libraries = ("toy_fast",)


class PortableExtend(Adapter):
    op = "mha_extend"
    libraries = ("toy_portable",)
