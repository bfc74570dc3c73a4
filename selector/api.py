"""The runtime entry point: ``select_kernel()`` over a cached default context.

The default context is built on first use: the manifest (``KERNELSEL_MANIFEST``
or the bundled one), the installed libraries, and the environment overrides,
each read once.  Selections are cached per request, so a hit costs about a
dict lookup; ``select_kernel(op=..., ...)`` also keys its raw keyword
arguments (``batch_size``, ``kv_len`` and ``new_len`` bucketed first), so a
hit does not build the request.  Each cache keeps at most ``cache_size``
entries (``Selector(cache_size=...)``, ``KERNELSEL_CACHE_SIZE``; 4096): an
insert into a full one keeps only its newer half.  ``reset()`` drops the
context (tests, or after changing the environment).

Thread safety: a cache hit is one ``dict.get`` and takes no lock (a dict read
is atomic under the GIL, and free-threaded CPython 3.13t guards each dict with
its own lock).  A miss takes the selector's lock, looks again, and only then
detects the arch, finds the perf table and solves: so a request is solved
once however many threads miss at the same time, every caller gets the same
``Selection`` object, and the platform and perf table change only under the
lock.  A selection is stored only once complete.  Eviction happens under the
lock too, by replacing the dict: a hit never takes a lock, never reorders
anything, and a reader holding the old dict still reads a whole one.  The
record of unavailable kernels (``selector.availability.UnavailableKernels``)
has its own lock; after a change it drops the cached selections (both caches)
under the selector's lock, so a miss that read the record before the change
cannot leave a stale selection behind.

Tuning on first use (``tune=True``, ``KERNELSEL_TUNE=1``; ``selector.tuning``)
happens on a miss, under the selector's lock: other threads' misses wait for
it (hits do not).  This machine's tuned table is laid over the perf table once
the GPU is known, whether or not this selector tunes.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from itertools import islice
from typing import Any, Mapping, Optional

from registry.errors import KernelselError, ManifestError, RequestError, brief
from registry.loader import load_manifest
from registry.perf import PerfTable, bucket, overlay
from registry.perf_policy import PERF_OFF, choose_perf_table
from registry.schema import Manifest
from registry.vocab import Arch, Backend, DType, Op, Solution
from selector.availability import UNAVAILABLE, UnavailableKernels, probe
from selector.overrides import ENV_PERF, Overrides
from selector.perf_check import perf_table_problems
from selector.platform import TORCH, Gpu, Platform, detect_gpus, installed_versions, required_distributions
from selector.request import BUCKETED_FIELDS, MAX_INT, KernelRequest
from selector.selection import KernelUnavailableError, NoKernelError, Selection
from selector.solver import solve
from selector.tuning import (
    TuneCache,
    TuneSettings,
    TuningError,
    budget_method,
    cache_dir,
    eligible_to_tune,
    share_first_rank,
    software_key,
    tune as tune_bucket,
)

log = logging.getLogger("kernelsel")

DEFAULT_CACHE_SIZE = 4096
"""Selections a Selector keeps per cache unless told otherwise (an engine sees a few hundred shape buckets)."""


def _cache_size(value: Any) -> int:
    if value is None:
        return DEFAULT_CACHE_SIZE
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestError(f"Selector(cache_size=...): expected a whole number of selections >= 1, got {value!r:.40}")
    return value


def _bounded(cache: dict, size: int) -> dict:
    """``cache`` with room for one more entry: its newer half when it is full (a new dict; readers keep theirs)."""
    if len(cache) < size:
        return cache
    return dict(islice(cache.items(), len(cache) - size // 2, None))


class Selector:
    """A manifest + platform + overrides, with a per-request cache of selections.

    It owns the record of kernels found unusable here (``unavailable_kernels``)
    and hands it to every selection it makes; a failure recorded there (by a
    selection building its adapter, or by ``mark_unavailable``) drops the cached
    selections, so the next one moves on.  A process group's selection
    (``select(request, group=...)``) goes through ``selector.distributed``,
    which uses only this class's public methods (its ``GroupMember`` protocol).

    ``tune=True`` times the eligible kernels of a bucket no table measured, on
    a miss, and keeps the times in this machine's tuned table
    (``selector.tuning``; ``tune_settings``: budget, device, folder);
    ``tuned_tables=True`` lays that table over ``perf`` without tuning (the
    default selector does, unless ``KERNELSEL_PERF=off``).

    Its caches keep at most ``cache_size`` selections each (default: the
    overrides' ``KERNELSEL_CACHE_SIZE``, else 4096).
    """

    def __init__(self, manifest: Manifest, platform: Platform, overrides: Overrides = Overrides(),
                 perf: Optional[PerfTable] = None, *, auto_perf: bool = False, tune: bool = False,
                 tune_settings: Optional[TuneSettings] = None, tuned_tables: bool = False,
                 cache_size: Optional[int] = None):
        self.manifest = manifest
        self.platform = platform
        self.overrides = overrides
        self.perf = perf
        self.tune = tune
        self.tune_settings = tune_settings or TuneSettings()
        self._auto_perf = auto_perf and perf is None  # find the committed table for the GPU, once known
        self._tuned_pending = tune or tuned_tables  # read this machine's tuned table once its GPU is known
        self._tune_cache: Optional[TuneCache] = None
        self._no_tune_cache = "no CUDA device to tune on"  # why there is no tuned table, when there is none
        self._tuned: Optional[PerfTable] = None
        self._ranking: tuple = (None, None, None)  # (perf, tuned, the two laid over each other)
        self._gpu: Optional[Gpu] = None  # found through torch once, when needed
        self._gpu_detected = False
        self.cache_size = _cache_size(cache_size if cache_size is not None else overrides.cache_size)
        self._cache: dict[KernelRequest, Selection] = {}
        self._by_fields: dict[tuple, Selection] = {}  # select_kernel's raw keyword arguments -> selection
        self._lock = threading.RLock()  # the miss path: solve, arch detection, perf lookup, dropping the cache
        self.unavailable_kernels = UnavailableKernels()
        self.unavailable_kernels.subscribe(self._forget_selections)
        self._agreed: dict[Any, Selection] = {}  # (request, process group) -> the selection the group agreed on
        self._group_lock = threading.Lock()  # one group selection (a collective) at a time; misses go on meanwhile

    @classmethod
    def from_env(cls) -> "Selector":
        overrides = Overrides.from_env()
        manifest = load_manifest(overrides.manifest)
        libraries = installed_versions(required_distributions(manifest.solutions))
        # the arch (and the GPU's committed perf table) is found through torch only when needed: see solve()
        perf = choose_perf_table(overrides.perf, setting_name=ENV_PERF)
        problems = perf_table_problems(perf.table, manifest) if perf.table is not None else []
        if problems:  # a table KERNELSEL_PERF names must fit the manifest
            raise ManifestError(problems)
        off = overrides.perf is not None and overrides.perf.strip().lower() == PERF_OFF
        return cls(manifest, Platform(arch=None, libraries=libraries, detected=True), overrides, perf.table,
                   auto_perf=perf.needs_gpu, tune=overrides.tune and not off, tuned_tables=not off)

    def _detected_gpu(self) -> Optional[Gpu]:
        """This machine's current GPU through torch (imports it), asked once per selector."""
        with self._lock:
            if not self._gpu_detected:
                self._gpu = detect_gpus((TORCH,)).current
                self._gpu_detected = True
            return self._gpu

    def _device_arch(self) -> Arch:
        if self.platform.arch is None:
            gpu = self._detected_gpu()
            if gpu is None or gpu.arch is None:
                raise RequestError(
                    "request.arch: not given and no CUDA device was detected; pass arch='sm_90' (or 9.0, sm90)"
                )
            self.platform = dataclasses.replace(self.platform, arch=gpu.arch, device_name=gpu.name)
        return self.platform.arch

    def solve(self, request: KernelRequest, *, tune: Optional[bool] = None) -> Selection:
        """The selection for ``request`` (cached), whether or not a kernel was found.

        ``tune`` (default: the selector's ``tune``) times the eligible kernels of
        an unmeasured bucket first, on a miss (``selector.tuning``).
        """
        hit = self._cache.get(request)
        if hit is not None:
            return hit
        tuning = self.tune if tune is None else tune
        with self._lock:
            hit = self._cache.get(request)
            if hit is not None:  # another thread solved it while this one waited
                return hit
            full = self.complete(require_request(request))
            torch_loaded = request.arch is None or "torch" in sys.modules
            if self._auto_perf and torch_loaded:
                self._auto_perf = False  # never import torch just for this: engines have it loaded already
                gpu = self._detected_gpu()
                if gpu is not None:
                    self.perf = choose_perf_table(None, gpu.name, gpu.arch).table
            if self._tuned_pending and (torch_loaded or tuning):
                self._tuned_table_file(full)
            selection = self.solve_excluding(full, {})
            if tuning:
                selection, keep = self._tune_miss(full, selection)
                if not keep:  # inside CUDA-graph capture: the next miss tunes
                    return selection
            cache = self._cache = _bounded(self._cache, self.cache_size)
            cache[request] = selection
            return selection

    # ------------------------------------------------------------------ tuning
    @property
    def ranking_table(self) -> Optional[PerfTable]:
        """The table that ranks: ``perf`` with this machine's tuned times laid over it (``registry.perf.overlay``)."""
        perf, tuned = self.perf, self._tuned
        if self._ranking[0] is not perf or self._ranking[1] is not tuned:
            self._ranking = (perf, tuned, overlay(perf, tuned))
        return self._ranking[2]

    def _tuned_table_file(self, request: KernelRequest) -> Optional[TuneCache]:
        """This machine's tuned table (read once, when its GPU is known), or None without a GPU to tune on."""
        with self._lock:
            if self._tuned_pending:
                if str(self.tune_settings.device).startswith("cuda"):
                    gpu = self._detected_gpu()
                    target = (gpu.name, gpu.arch) if gpu is not None and gpu.arch is not None else None
                else:
                    target = (str(self.tune_settings.device), request.arch)
                self._tuned_pending = False
                if target is not None:
                    try:
                        folder = self.tune_settings.cache_dir or cache_dir()
                    except TuningError as exc:  # selection goes on without this machine's tuned times
                        log.warning("kernelsel: no tuned table: %s", exc)
                        self._no_tune_cache = str(exc)
                        return None
                    self._tune_cache = TuneCache.for_machine(target[0], target[1], software_key(self.platform), folder)
                    self._tuned = self._tune_cache.load()
            return self._tune_cache

    def _tune_miss(self, request: KernelRequest, selection: Selection) -> tuple[Selection, bool]:
        """``selection`` after tuning its bucket if no table measured it, and whether it may be cached."""
        try:
            times = self.tune_bucket(request, selection)
        except TuningError as exc:
            log.info("kernelsel: %s selected without tuning: %s", request.op.value, exc)
            return selection, not exc.retry
        return (self.solve_excluding(request, {}) if times else selection), True

    def tune_bucket(self, request: KernelRequest, selection: Optional[Selection] = None) -> dict[str, float]:
        """Time the eligible kernels of ``request``'s bucket unless a table measured them all; add them to the
        tuned table.  The times (empty when nothing needed timing).  Raises ``TuningError`` (see ``selector.tuning``).
        """
        full = self.complete(request)
        selection = selection if selection is not None else self.solve_excluding(full, {})
        names = eligible_to_tune(selection)
        if not names or set(names) <= selection.measured.keys():  # measured: worded when read, so read once
            return {}
        cache = self._tuned_table_file(full)
        if cache is None:
            raise TuningError(f"{self._no_tune_cache} (tune_settings.device {self.tune_settings.device!r})")

        def adapter(name: str) -> Any:
            built, reason = self.build_adapter(name, full)
            if built is None:
                raise TuningError(reason or f"{name}: adapter not built")
            return built

        settings = self.tune_settings
        result = tune_bucket(full, names, adapter, device=settings.device, budget=settings.budget)
        if result.times:
            self.add_tuned(full, result.times, budget_method(settings.budget, result.method))
        return dict(result.times)

    def add_tuned(self, request: KernelRequest, times: Mapping[str, float], method: str) -> None:
        """Add measured ``times`` of ``request``'s bucket to this machine's tuned table (file and ranking)."""
        from selector.tuning import TuneResult

        cache = self._tuned_table_file(self.complete(request))
        if cache is None:
            return
        with self._lock:
            self._tuned = cache.add([TuneResult(self.complete(request), times=dict(times))], method)
            self._cache = {}
            self._by_fields = {}

    def tuned_table_key(self) -> Optional[str]:
        """The file name of this machine's tuned table (GPU model, arch, library versions), or None."""
        return self._tune_cache.path.name if self._tune_cache is not None else None

    def complete(self, request: KernelRequest) -> KernelRequest:
        """``request`` with the arch of this machine's GPU filled in when it has none."""
        if request.arch is not None:
            return request
        with self._lock:
            return KernelRequest(**{**request.model_dump(exclude_defaults=True), "arch": self._device_arch()})

    def solve_excluding(self, request: KernelRequest, excluded: Mapping[str, str]) -> Selection:
        """A fresh (uncached) selection for ``request`` with the ``excluded`` kernels rejected for the reasons given.

        A process group uses it for the selection it agreed on: this rank's
        verdicts, with the kernels another rank cannot run rejected and why.
        """
        full = self.complete(request)
        return solve(self.manifest, self.platform, full, self.overrides, self.ranking_table, excluded,
                     unavailable_kernels=self.unavailable_kernels)

    def select(self, request: KernelRequest, *, group: Any = None, tune: Optional[bool] = None) -> Selection:
        """Like ``solve`` but raises NoKernelError when nothing fits.

        With ``group`` (a ``torch.distributed`` process group) every rank of the
        group gets the same kernel: see ``selector.distributed``.  The agreed
        selection is cached per (request, group).  With tuning, the group's
        first rank tunes the bucket and every rank takes its times
        (``agree_on_tuning``), so no two ranks rank by different timings.
        """
        require_request(request)
        tuning = self.tune if tune is None else tune
        if group is not None:
            key = (request, group)
            try:
                hit = self._agreed.get(key)
            except TypeError:  # an unhashable group is no process group: say what is
                from selector.distributed import check_group

                check_group(group)
                raise
            if hit is not None:
                return hit
            with self._group_lock:  # not self._lock: other threads' cache misses go on during the collective
                hit = self._agreed.get(key)
                if hit is None:
                    from selector.distributed import select_in_group

                    member: Any = self
                    if tuning:
                        self.agree_on_tuning(request, group)
                        member = _WithoutTuning(self)
                    hit = select_in_group(member, request, group)
                    agreed = self._agreed = _bounded(self._agreed, self.cache_size)
                    agreed[key] = hit
            return hit
        selection = self.solve(request, tune=tuning)
        if selection.kernel is None:
            raise self._no_kernel(selection)
        return selection

    def agree_on_tuning(self, request: KernelRequest, group: Any) -> None:
        """The collective part of tuning in a process group: the first rank tunes, every rank keeps its times.

        Never raises before the collective (a rank whose request or tuning fails
        shares nothing, as if the bucket needed no tuning); a rank whose tuned
        table is for another GPU model or library versions does not keep the
        first rank's times (the group ranks by the first rank's order anyway).
        """
        import torch.distributed as dist

        proposal = None
        if dist.get_rank(group) == 0:
            try:
                times = self.tune_bucket(request)
                if times:
                    proposal = {"table": self.tuned_table_key(), "times": times,
                                "method": budget_method(self.tune_settings.budget, "timed on the group's first rank")}
            except Exception as exc:  # noqa: BLE001 - the other ranks are waiting in the collective
                log.info("kernelsel: %s not tuned for the group: %s", request.op.value, exc)
        agreed = share_first_rank(proposal, group)
        if agreed and dist.get_rank(group) != 0:
            try:
                full = self.complete(request)
                self._tuned_table_file(full)
                if self.tuned_table_key() == agreed["table"]:
                    self.add_tuned(full, agreed["times"], agreed["method"])
            except Exception as exc:  # noqa: BLE001 - the group decision still follows the first rank
                log.info("kernelsel: the group's tuned times not kept on this rank: %s", exc)

    def forced_kernel(self, request: KernelRequest) -> Optional[str]:
        """The kernel forced for ``request`` (its ``kernel=``, else ``KERNELSEL_FORCE_<OP>``), or None."""
        return request.kernel or self.overrides.forced(request.op)

    def _no_kernel(self, selection: Selection) -> NoKernelError:
        """NoKernelError, or KernelUnavailableError when a forced kernel is known to be unusable here."""
        if selection.forced_by:
            name = self.forced_kernel(selection.request)
            reason = self.unavailable_reason(name, selection.request)
            if reason is not None:
                return KernelUnavailableError(selection, [(name, reason)])
        return NoKernelError(selection)

    # ------------------------------------------------------------ availability
    def build_adapter(self, kernel: str, request: KernelRequest) -> tuple[Any, Optional[str]]:
        """``kernel``'s adapter for ``request`` (``(adapter, None)``), or ``(None, reason)``, recorded as unavailable.

        No fallback: a process group builds the kernel it agreed on this way on
        every rank, and drops it everywhere if any rank gets a reason.
        """
        spec = self.manifest.by_name[kernel]
        install = self.manifest.solutions[spec.solution].install
        return self.unavailable_kernels.build_adapter(spec, self.complete(request), install)

    def mark_unavailable(self, kernel: str, reason: str, request: Optional[KernelRequest] = None) -> None:
        """Record that ``kernel``'s adapter cannot be used here (for ``request`` only, or for every request).

        Later selections reject it with ``reason`` (explain shows it) and pick
        the next eligible kernel; cached selections are dropped so they do.
        ``Selection.adapter`` records failures the same way (in
        ``unavailable_kernels``); an engine may call this too (e.g. after a
        failed warm-up run).
        """
        if kernel not in self.manifest.by_name:
            raise RequestError(f"mark_unavailable: no kernel named {kernel!r}")
        self.unavailable_kernels.mark(kernel, reason, None if request is None else self.complete(request))

    def _forget_selections(self) -> None:
        """The unavailable-kernel record changed: cached selections may be stale (a hit stays one dict lookup)."""
        with self._lock:
            self._cache = {}
            self._by_fields = {}

    def _remember_fields(self, key: tuple, request: KernelRequest, selection: Selection) -> None:
        """Key ``selection`` by the raw keyword arguments it was made from, unless it was dropped meanwhile."""
        with self._lock:
            if self._cache.get(request) is selection:  # not dropped since (an unavailability, tuned times)
                cache = self._by_fields = _bounded(self._by_fields, self.cache_size)
                cache[key] = selection

    def unavailable_reason(self, kernel: str, request: Optional[KernelRequest] = None) -> Optional[str]:
        """Why ``kernel`` cannot be used here (for ``request``), or None if nothing is recorded."""
        return self.unavailable_kernels.reason(kernel, request)

    @property
    def unavailable(self) -> dict[str, str]:
        """Kernels recorded as unusable here for every request: name -> reason."""
        return self.unavailable_kernels.kernel_wide

    def probe(self, request: KernelRequest) -> Selection:
        """Import every eligible kernel's adapter and libraries now; record the failures; solve again.

        The selection then rejects kernels whose library is installed but does
        not import (explain shows why).  Imports torch, flashinfer, triton.
        """
        for kernel in self.solve(request).eligible:
            _, reason = probe(kernel.adapter, self.manifest.solutions[kernel.solution].install)
            if reason is not None:
                self.mark_unavailable(kernel.name, UNAVAILABLE + reason)
        return self.solve(request)


class _WithoutTuning:
    """A selector as a process group uses it once tuning was agreed: its solves never tune on their own."""

    def __init__(self, selector: Selector):
        self._selector = selector

    def __getattr__(self, name: str) -> Any:
        return getattr(self._selector, name)

    def solve(self, request: KernelRequest) -> Selection:
        return self._selector.solve(request, tune=False)


_DEFAULT: Optional[Selector] = None
_LOCK = threading.Lock()


def default_selector() -> Selector:
    """The selector built from the environment, once (``reset()`` forgets it).

    Returns the one it read or built, never the global read again: ``reset()``
    in another thread in between would make that None.
    """
    global _DEFAULT
    selector = _DEFAULT
    if selector is None:
        with _LOCK:
            selector = _DEFAULT
            if selector is None:
                selector = _DEFAULT = Selector.from_env()
    return selector


_KEYABLE: frozenset = frozenset({str, int, float, bool, type(None), Op, Arch, DType, Solution, Backend})
"""Argument types whose equal values always mean the same request (a ``str`` equal to an enum names that member)."""

_AMBIGUOUS = frozenset({bool, float})
"""Types whose values equal integers of another meaning (``True == 1``, ``9.0 == 9``): a key then holds every type."""

_CALL_SHAPES: dict[tuple[str, ...], tuple[int, tuple[int, ...]]] = {}
"""Keyword names in call order -> (a number standing for them in keys, where the bucketed fields sit)."""
_CALL_SHAPES_LOCK = threading.Lock()
_MAX_CALL_SHAPES = 1024


def _call_shape(names: tuple[str, ...]) -> Optional[tuple[int, tuple[int, ...]]]:
    with _CALL_SHAPES_LOCK:
        shape = _CALL_SHAPES.get(names)
        if shape is None and len(_CALL_SHAPES) < _MAX_CALL_SHAPES:
            shape = _CALL_SHAPES[names] = (len(_CALL_SHAPES), tuple(i + 1 for i, n in enumerate(names) if n in BUCKETED_FIELDS))
        return shape


def _fields_key(fields: dict[str, Any]) -> Optional[tuple]:
    """A cache key from ``select_kernel``'s raw keyword arguments, or None: then the full path builds the request.

    A number standing for the argument names (in call order), the values with
    ``batch_size``/``kv_len``/``new_len`` bucketed as the request will (so a
    growing KV length keeps hitting), and -- when a value is a ``bool`` or
    ``float`` -- every value's type: ``arch=9.0`` is sm_90 but ``arch=9`` is
    refused, though ``9.0 == 9``.  Anything else -- a value of another type, a
    bucketed field that is not an integer in range -- takes the full path,
    which raises what it always raised.
    """
    global _KEYABLE
    names = (*fields,)
    shape = _CALL_SHAPES.get(names) or _call_shape(names)
    if shape is None:
        return None
    values = [shape[0], *fields.values()]
    types = {*map(type, values)}
    if not types <= _KEYABLE:
        extra = types - _KEYABLE
        if any(getattr(t, "__module__", None) != "torch" or getattr(t, "__qualname__", None) != "dtype" for t in extra):
            return None
        _KEYABLE = _KEYABLE | extra  # torch.bfloat16 and friends: singletons, equal only to themselves
    for i in shape[1]:
        value = values[i]
        if value is not None:
            if value.__class__ is not int or not 1 <= value <= MAX_INT:
                return None
            values[i] = bucket(value)
    return (*values,) if types.isdisjoint(_AMBIGUOUS) else (*values, *map(type, values))


def reset() -> None:
    """Forget the default context: the manifest, platform and environment are read again on next use.

    Threads selecting meanwhile finish with the selector they already hold.
    """
    global _DEFAULT
    with _LOCK:
        _DEFAULT = None


def _request_of(request: Any, fields: dict[str, Any]) -> KernelRequest:
    """The request to select for: the KernelRequest given, or one built from keyword fields."""
    if request is None:
        return KernelRequest(**fields)
    if fields:
        raise RequestError(f"pass either a KernelRequest or keyword fields, not both (got {', '.join(fields)})")
    return require_request(request)


def require_request(request: Any) -> KernelRequest:
    """``request`` if it is a KernelRequest, else a RequestError saying what select_kernel takes."""
    if not isinstance(request, KernelRequest):
        raise RequestError(f"select_kernel takes a KernelRequest or keyword fields (select_kernel(op='mha_decode', "
                           f"arch='sm_90', ...)), got {type(request).__name__} {brief(request)}")
    return request


def _selector_of(manifest: Any, platform: Any) -> Selector:
    """The default selector, or one over the ``manifest`` / ``platform`` given (each checked)."""
    if manifest is not None and not isinstance(manifest, Manifest):
        raise RequestError(f"manifest= takes a Manifest (registry.load_manifest(path)), got "
                           f"{type(manifest).__name__} {brief(manifest)}")
    if platform is not None and not isinstance(platform, Platform):
        raise RequestError(f"platform= takes a Platform (Platform.hypothetical('sm_90'), or leave it out for this "
                           f"machine), got {type(platform).__name__} {brief(platform)}")
    if manifest is None and platform is None:
        return default_selector()
    base = default_selector() if (manifest is None or platform is None) else None
    return Selector(
        manifest if manifest is not None else base.manifest,
        platform if platform is not None else base.platform,
        base.overrides if base is not None else Overrides(),
        base.perf if base is not None else None,
        tune_settings=base.tune_settings if base is not None else None,
    )


def select_kernel(
    request: Optional[KernelRequest] = None,
    /,
    *,
    manifest: Optional[Manifest] = None,
    platform: Optional[Platform] = None,
    **fields: Any,
) -> Selection:
    """Resolve a request to a kernel.  ``select_kernel(req)`` or ``select_kernel(op=..., arch=..., ...)``.

    Raises ``RequestError`` for a bad field and ``NoKernelError`` (listing every
    kernel with its reasons) when nothing fits or a forced kernel cannot serve.
    Safe to call from many threads at once.

    ``group=`` (keyword; a ``torch.distributed`` process group) makes it a
    collective: call it on every rank of the group; all ranks get the best
    kernel eligible (and whose adapter builds) on every rank, or all raise
    the same ``GroupSelectionError``.  See ``selector.distributed``.  (It
    travels in ``fields`` so that the cached path stays one dict lookup.)

    ``tune=True`` (keyword; default: ``KERNELSEL_TUNE``) times the eligible
    kernels of a bucket no perf table measured before selecting, when the
    request is first selected (a miss), and keeps the times in this machine's
    tuned table: see ``selector.tuning``.
    """
    key = None
    if manifest is None and platform is None:
        if request is not None and not fields:
            selector = _DEFAULT or default_selector()
            try:
                hit = selector._cache.get(request)
            except TypeError:  # unhashable, so not a request: select() says what it takes
                hit = None
            if hit is not None and hit.kernel is not None:
                return hit
            return selector.select(request)
        if request is None:
            key = _fields_key(fields)
            default = _DEFAULT
            if key is not None and default is not None:
                hit = default._by_fields.get(key)
                if hit is not None and hit.kernel is not None:
                    return hit
    group = fields.pop("group", None)
    tune = fields.pop("tune", None)
    try:
        request = _request_of(request, fields)
        selector = _selector_of(manifest, platform)
    except KernelselError as exc:
        if group is None:
            raise
        from selector.distributed import fail_in_group

        fail_in_group(fields.get("op") or getattr(request, "op", None), exc, group)  # the other ranks are waiting
    selection = selector.select(request, group=group, tune=tune)
    if key is not None and group is None:  # the default selector's: key it by the raw keyword arguments too
        selector._remember_fields(key, request, selection)
    return selection
