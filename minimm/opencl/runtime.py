"""The OpenCL runtime: pick a device, build programs once, launch kernels cheaply.

What this file teaches:
- An OpenCL program is C source compiled at run time for the device in hand. Building costs from a tenth
  of a second to a few seconds, so every built program is cached per context and per hash of its source
  and build-time defines (tile sizes, transpose flags); each kernel object is cached with it.
- Launching from Python is dominated by argument conversion. pyopencl is fast when it knows each scalar
  argument's C type up front, so we build with -cl-kernel-arg-info and tell it the types ourselves
  (about 6 us per launch instead of 40 on PoCL; a token of generation is ~60 launches).
- Device memory comes from a pool: a training step allocates and frees the same sizes every time.
- The device string is "opencl" (the first GPU of any platform, else the first device) or "opencl:P:D"
  (platform P, device D, as `clinfo -l` numbers them). With no OpenCL at all the error says how to get one.

The OpenCL 1.2 specification (the subset used here): https://registry.khronos.org/OpenCL/specs/opencl-1.2.pdf
"""
from __future__ import annotations

import hashlib

import numpy as np

INSTALL_HINT = ("install an OpenCL platform: `pip install pyopencl pocl-binary-distribution` gives a CPU "
                "device (PoCL); for a GPU install pyopencl and your GPU vendor's OpenCL driver (ICD)")


class OpenCLUnavailable(RuntimeError):
    """pyopencl is missing, or it finds no platform or device."""


def _import_pyopencl():
    try:
        import pyopencl as cl
        import pyopencl.tools  # noqa: F401  (MemoryPool lives there)
    except ImportError as e:
        raise OpenCLUnavailable(f"pyopencl does not import ({e}): {INSTALL_HINT}") from e
    return cl


def parse_device(spec: str) -> tuple[int, int] | None:
    """"opencl" -> None (choose automatically); "opencl:P:D" -> (P, D)."""
    parts = spec.split(":")
    if parts[0] != "opencl" or len(parts) not in (1, 3):
        raise ValueError(f"device {spec!r}: expected 'opencl' or 'opencl:PLATFORM:DEVICE', e.g. 'opencl:0:0'")
    if len(parts) == 1:
        return None
    try:
        return int(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"device {spec!r}: platform and device must be integers, e.g. 'opencl:0:0'") from None


def list_devices() -> list[tuple[int, int, str]]:
    """Every OpenCL device as (platform index, device index, description)."""
    cl = _import_pyopencl()
    try:
        platforms = cl.get_platforms()
    except cl.Error:  # the ICD loader reports "no platform" as an error
        platforms = []
    return [(p, d, f"{dev.name.strip()} on {plat.name.strip()}")
            for p, plat in enumerate(platforms) for d, dev in enumerate(plat.get_devices())]


class Device:
    """One OpenCL device with its context, in-order queue, memory pool and program cache."""

    def __init__(self, cl_device):
        cl = _import_pyopencl()
        self.cl = cl
        self.cl_device = cl_device
        self.name = f"{cl_device.name.strip()} ({cl_device.platform.name.strip()})"
        self.context = cl.Context([cl_device])
        self.queue = cl.CommandQueue(self.context)
        self.pool = cl.tools.MemoryPool(cl.tools.ImmediateAllocator(self.queue))
        self.is_cpu = bool(cl_device.type & cl.device_type.CPU)
        self.vector_width = max(1, cl_device.preferred_vector_width_float)
        self.max_work_group_size = cl_device.max_work_group_size
        self._programs: dict[tuple[str, str], object] = {}  # (source hash, build options) -> Program
        self._kernels: dict[tuple, object] = {}  # (name, source, defines) -> Kernel

    def __repr__(self) -> str:
        return f"Device({self.name})"

    def kernel(self, source: str, name: str, **defines: int | float):
        """The kernel `name` of `source` built with `-D KEY=VALUE` for each define; built once, then cached.

        Looked up by the source string itself (Python caches a string's hash, so this costs well under a
        microsecond per launch); the program cache below is keyed by a hash of the source.
        """
        key = (name, source, tuple(defines.items()))
        kernel = self._kernels.get(key)
        if kernel is None:
            options = " ".join(f"-D{k}={v}" for k, v in sorted(defines.items()))
            kernel = self.cl.Kernel(self._program(source, options), name)
            kernel.set_scalar_arg_dtypes([_scalar_dtype(kernel, i) for i in range(kernel.num_args)])
            self._kernels[key] = kernel
        return kernel

    def _program(self, source: str, options: str):
        source_hash = hashlib.sha256(source.encode()).hexdigest()
        program = self._programs.get((source_hash, options))
        if program is None:
            program = self.cl.Program(self.context, source).build(options=f"-cl-kernel-arg-info {options}")
            self._programs[(source_hash, options)] = program
        return program

    def launch(self, kernel, global_size: tuple[int, ...], local_size: tuple[int, ...] | None, *args) -> None:
        """Enqueue kernel over global_size work-items (rounded up to whole groups); returns at once."""
        if local_size is not None:
            global_size = tuple(-(-g // l) * l for g, l in zip(global_size, local_size))
        kernel(self.queue, global_size, local_size, *args)

    def alloc(self, nbytes: int):
        """A device buffer of at least nbytes from the pool (OpenCL has no empty buffers)."""
        return self.pool.allocate(max(int(nbytes), 4))

    def upload(self, array: np.ndarray):
        buf = self.alloc(array.nbytes)
        if array.nbytes:
            self.cl.enqueue_copy(self.queue, buf, np.ascontiguousarray(array))
        return buf

    def download(self, buf, shape: tuple[int, ...], dtype) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        if out.nbytes:
            self.cl.enqueue_copy(self.queue, out, buf)  # blocking: waits for every kernel before it
        return out

    def fill(self, buf, value: float, nbytes: int) -> None:
        self.cl.enqueue_fill_buffer(self.queue, buf, np.float32(value), 0, max(int(nbytes), 4))

    def synchronize(self) -> None:
        self.queue.finish()


def _scalar_dtype(kernel, index: int):
    """numpy dtype of a by-value kernel argument, None for buffers (pyopencl's convention)."""
    cl = _import_pyopencl()
    type_name = kernel.get_arg_info(index, cl.kernel_arg_info.TYPE_NAME).strip()
    if type_name.endswith("*"):
        return None
    return {"int": np.int32, "uint": np.uint32, "float": np.float32, "long": np.int64}[type_name]


_devices: dict[str, Device] = {}


def get_device(spec: str = "opencl") -> Device:
    """The Device for "opencl" or "opencl:P:D"; the same object every time for the same string."""
    if spec in _devices:
        return _devices[spec]
    choice = parse_device(spec)
    cl = _import_pyopencl()
    found = list_devices()
    if not found:
        raise OpenCLUnavailable(f"pyopencl finds no OpenCL platform or device: {INSTALL_HINT}")
    platforms = cl.get_platforms()
    if choice is None:
        gpus = [(p, d) for p, d, _ in found if platforms[p].get_devices()[d].type & cl.device_type.GPU]
        choice = gpus[0] if gpus else found[0][:2]
    p, d = choice
    if (p, d) not in [(fp, fd) for fp, fd, _ in found]:
        listing = "; ".join(f"opencl:{fp}:{fd} = {desc}" for fp, fd, desc in found)
        raise ValueError(f"device {spec!r} does not exist. Devices here: {listing}")
    _devices[spec] = Device(platforms[p].get_devices()[d])
    return _devices[spec]


def is_available() -> bool:
    """True when pyopencl imports and finds at least one device (what the tests skip on)."""
    try:
        return bool(list_devices())
    except OpenCLUnavailable:
        return False
