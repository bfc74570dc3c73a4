"""Adapters of the toy manifest (``toy_manifest.yaml``): each imports one stand-in library and does nothing else.

The ``toy`` fixture puts the stand-ins in ``sys.modules``; a test breaks one (``break_import``) to make
exactly the kernels that use it unavailable, with no torch or GPU library involved.  ``run()`` only
waits ``delay`` seconds (a class attribute a test may set) and hands back ``out``: tuning tests time it.
"""

from __future__ import annotations

import time

from registry.adapters.base import Adapter


class ToyAdapter(Adapter):
    delay = 0.0

    def plan(self, metadata):
        self.metadata = metadata

    def run(self, *inputs, out=None, lse=None, **options):
        time.sleep(type(self).delay)
        return out


class FastDecode(ToyAdapter):
    op = "mha_decode"
    libraries = ("toy_fast",)


class LayoutDecode(ToyAdapter):
    op = "mha_decode"
    libraries = ("toy_layout",)


class PortableDecode(ToyAdapter):
    op = "mha_decode"
    libraries = ("toy_portable",)


class ReferenceDecode(ToyAdapter):
    op = "mha_decode"
    libraries = ("toy_reference",)


class FastMLA(ToyAdapter):
    op = "mla_decode"
    libraries = ("toy_fast",)


class PortableMLA(ToyAdapter):
    op = "mla_decode"
    libraries = ("toy_portable",)


class ReferenceMLA(ToyAdapter):
    op = "mla_decode"
    libraries = ("toy_reference",)


class FastExtend(ToyAdapter):
    op = "mha_extend"
    libraries = ("toy_fast",)


class PortableExtend(ToyAdapter):
    op = "mha_extend"
    libraries = ("toy_portable",)
