"""What developers run: the ``kernelsel`` CLI and the tools behind it.

``cli`` (the console script), ``diff`` and ``request_space`` (reviewing a manifest edit), ``matrix`` (the
support matrix), ``schema`` (the manifest's JSON Schema), ``bench`` (recording perf tables), ``verify``
(kernels against the torch reference on a GPU), ``doctor`` (this machine).  The runtime (``selector``)
never imports this package; a test guards that.
"""
