"""cuBLASLt matmuls, called through ctypes: every matmul of the GPU step, some with a fused epilogue.

torch's matmuls run on cuBLAS(Lt) already, but torch takes the first algorithm cuBLAS's heuristic offers and exposes
only the bias epilogue. Called directly, cuBLASLt gives us two things:
- the choice of algorithm. The heuristic offers up to 8 candidates per shape; we time them on the first call and keep
  the fastest: for several of GPT-2's shapes another candidate beats the first (dev/matmul_algos.py; BENCHMARKS.md,
  fourth session, and "Design measurements quoted from the code").
- the MLP's GELU in the fc matmul. The GELU is an elementwise pass over the largest activation, fch (N, 4C): a
  separate kernel reads fch back and writes gelu(fch). cuBLASLt's GELU_AUX_BIAS epilogue applies the bias and GELU
  while the product is still in registers and writes both fch = inp @ W^T + b (to "aux": the backward needs it) and
  gelu(fch) (to D), which saves reading fch back. (cuBLASLt also has the backward, DGELU, but its kernels run far
  slower than the plain GEMM, which loses more than the fusion saves; dev/gelu_fusion.py measures it: BENCHMARKS.md,
  third session, "Is the MLP's GELU better inside the matmuls?". The backward keeps a plain matmul + our GELU kernel.)

cuBLASLt is column-major. A row-major (R, K) matrix is the same memory as a column-major (K, R) one, so a row-major
product out (N, OC) = X (N, K) @ Y is computed as the column-major out^T (OC, N) = Y^T @ X^T: A = Y^T, B = X^T.

This module is the binding and nothing else: loading the library, the descriptors, a plan (descriptors and the
fastest of the heuristic's algorithms) cached per shape, and the call on torch's current stream. The row-major
meaning of the product lives in llmpy.vendor. GPU only: CPU runs (Triton's interpreter) never get here.
"""

import ctypes
import ctypes.util

import torch

# enum values from cublasLt.h and library_types.h
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF, _CUDA_R_8F_E4M3, _CUDA_R_8F_E5M2 = 0, 2, 14, 28, 29
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32 = 68, 77
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER, _DESC_AUX_POINTER, _DESC_AUX_LD = 3, 4, 7, 8, 11, 12
_DESC_A_SCALE_POINTER, _DESC_B_SCALE_POINTER, _DESC_FAST_ACCUM = 17, 18, 25
_PREF_MAX_WORKSPACE_BYTES = 1
_PREF_MIN_ALIGNMENT = {"a": 5, "b": 6, "c": 7, "d": 8}
EPILOGUE = {"default": 1, "bias": 4, "gelu_aux_bias": 164, "dgelu": 192, "dgelu_bgrad": 208}
_DATA_TYPE = {torch.float32: _CUDA_R_32F, torch.float16: _CUDA_R_16F, torch.bfloat16: _CUDA_R_16BF,
              torch.float8_e4m3fn: _CUDA_R_8F_E4M3, torch.float8_e5m2: _CUDA_R_8F_E5M2}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_WORKSPACE_BYTES = 32 * 1024 * 1024  # what cuBLAS itself takes on Hopper
_CANDIDATES = 8  # algorithms asked of the heuristic per shape, then timed
# False (--deterministic 1): take the heuristic's first algorithm without timing. Timing can pick another algorithm in
# another process (candidates within a few % of each other trade places), and another algorithm rounds differently
TIME_ALGORITHMS = True


class CublasLtError(RuntimeError):
    pass


class _Algo(ctypes.Structure):  # cublasLtMatmulAlgo_t: opaque
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _HeuristicResult(ctypes.Structure):  # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", _Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_lib, _handle, _workspace, _plans = None, None, {}, {}
_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)


def _load():
    """The cuBLASLt that torch itself loaded (so both agree on the version), found in this process's memory map."""
    global _lib, _handle
    if _lib is not None:
        return
    torch.cuda.current_blas_handle()  # makes torch load and initialise cuBLAS(Lt)
    with open("/proc/self/maps") as maps:
        path = next((line.split()[-1] for line in maps if "libcublasLt.so" in line), None)
    path = path or ctypes.util.find_library("cublasLt")
    if path is None:
        raise CublasLtError("cuBLASLt: libcublasLt.so is neither loaded by torch nor on the library path; "
                            "the GPU mainline needs a CUDA build of torch")
    lib = ctypes.CDLL(path)
    lib.cublasLtMatrixLayoutCreate.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64,
                                               ctypes.c_int64]
    lib.cublasLtMatmul.argtypes = [ctypes.c_void_p] * 14 + [ctypes.c_size_t, ctypes.c_void_p]
    for setter in (lib.cublasLtMatmulDescSetAttribute, lib.cublasLtMatmulPreferenceSetAttribute):
        setter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    handle = ctypes.c_void_p()
    _check(lib.cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
    _lib, _handle = lib, handle


def _check(status, what):
    if status != 0:
        raise CublasLtError(f"cuBLASLt: {what} failed with status {status}")


def _set(setter, obj, attribute, value):
    _check(setter(obj, attribute, ctypes.byref(value), ctypes.sizeof(value)), f"setting attribute {attribute}")


def _alignment(tensor):
    """The largest power of two up to 256 dividing the tensor's address: cuBLASLt assumes 256 unless told."""
    address = tensor.data_ptr()
    return min(256, address & -address)


def _layout(dtype, rows, cols, ld):
    layout = ctypes.c_void_p()
    _check(_lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), _DATA_TYPE[dtype], rows, cols, ld),
           "cublasLtMatrixLayoutCreate")
    return layout


def _plan(a_dtype, b_dtype, d_dtype, tf32, fast_accum, m, n, k, trans_a, trans_b, lda, ldb, ldd, epilogue,
          alignments):
    """[descriptor, layouts of A, B and D, the heuristic's candidate algorithms] for one shape.
    A and B are a_dtype and b_dtype (the same, except FP8's e4m3 and e5m2); D (and C, laid out as D) d_dtype: fp32 D
    with bf16 A and B accumulates bf16 products into fp32 gradients. fast_accum: FP8's products summed in the tensor
    cores' own accumulator throughout, instead of promoted to fp32 now and then (faster, less exact)."""
    desc = ctypes.c_void_p()
    _check(_lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F_FAST_TF32 if tf32 else _COMPUTE_32F,
                                         _CUDA_R_32F), "cublasLtMatmulDescCreate")
    setter = _lib.cublasLtMatmulDescSetAttribute
    _set(setter, desc, _DESC_TRANSA, ctypes.c_int32(_OP_T if trans_a else _OP_N))
    _set(setter, desc, _DESC_TRANSB, ctypes.c_int32(_OP_T if trans_b else _OP_N))
    _set(setter, desc, _DESC_EPILOGUE, ctypes.c_int32(EPILOGUE[epilogue]))
    if fast_accum:
        _set(setter, desc, _DESC_FAST_ACCUM, ctypes.c_int8(1))
    # A is (m, k) after its op, B (k, n), D (m, n); the layouts describe them as stored
    a_layout = _layout(a_dtype, k if trans_a else m, m if trans_a else k, lda)
    b_layout = _layout(b_dtype, n if trans_b else k, k if trans_b else n, ldb)
    d_layout = _layout(d_dtype, m, n, ldd)
    preference = ctypes.c_void_p()
    _check(_lib.cublasLtMatmulPreferenceCreate(ctypes.byref(preference)), "cublasLtMatmulPreferenceCreate")
    pref_setter = _lib.cublasLtMatmulPreferenceSetAttribute
    _set(pref_setter, preference, _PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(_WORKSPACE_BYTES))
    for name, alignment in alignments.items():
        _set(pref_setter, preference, _PREF_MIN_ALIGNMENT[name], ctypes.c_uint32(alignment))
    results, found = (_HeuristicResult * _CANDIDATES)(), ctypes.c_int(0)
    _check(_lib.cublasLtMatmulAlgoGetHeuristic(_handle, desc, a_layout, b_layout, d_layout, d_layout, preference,
                                               _CANDIDATES, results, ctypes.byref(found)),
           "cublasLtMatmulAlgoGetHeuristic")
    candidates = [results[i].algo for i in range(found.value) if results[i].state == 0]
    if not candidates:
        raise CublasLtError(f"cuBLASLt has no algorithm for the {epilogue} epilogue with m={m} n={n} k={k} "
                            f"{a_dtype} x {b_dtype} -> {d_dtype}"
                            + ("; run with -ge 0" if "gelu" in epilogue else ""))
    return [desc, a_layout, b_layout, d_layout, candidates]


def _launchable(candidates, launch):
    """The candidates that launch. The heuristic offers some that cuBLASLt then refuses (status 15, not supported:
    seen with FP8 operands and the bias epilogue on the H200), so each is tried once before any is chosen."""
    working = []
    for algo in candidates:
        try:
            launch(algo)
            working.append(algo)
        except CublasLtError:
            pass
    return working


def _fastest(candidates, launch):
    """The candidate algorithm that runs fastest, timed with CUDA events in bursts of ~1 ms (3 rounds, every candidate
    once a round, the median per candidate). The heuristic's first candidate is kept unless another beats it by more
    than 2%: smaller differences are within what the same algorithm moves from round to round (dev/matmul_algos.py).
    """
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    launch(candidates[0])
    end.record()
    torch.cuda.synchronize()
    reps = max(1, int(1.0 / max(start.elapsed_time(end), 1e-3)))
    times = [[] for _ in candidates]
    for _ in range(3):
        for algo, algo_times in zip(candidates, times):
            start.record()
            for _ in range(reps):
                launch(algo)
            end.record()
            torch.cuda.synchronize()
            algo_times.append(start.elapsed_time(end) / reps)
    medians = [sorted(algo_times)[1] for algo_times in times]
    best = medians.index(min(medians))
    return candidates[best] if medians[best] < 0.98 * medians[0] else candidates[0]


def matmul(d, a, b, m, n, k, trans_a, trans_b, lda, ldb, ldd, epilogue="default", bias=None, aux=None, aux_ld=0,
           c=None, a_scale=None, b_scale=None, fast_accum=False):
    """Column-major D (m, n) = op(A) (m, k) @ op(B) (k, n), plus C if given (laid out as D; C = D accumulates into D),
    then the epilogue:
      "bias"           D = AB + bias
      "gelu_aux_bias"  aux = AB + bias, D = gelu(aux)
      "dgelu"          D = AB * gelu'(aux)
      "dgelu_bgrad"    D = AB * gelu'(aux), bias (m,) = D summed over its n columns (overwritten)
    a, b, bias, aux: torch tensors of one dtype on the current GPU, d of the same or fp32; lda, ldb, ldd, aux_ld: column
    strides (elements).
    FP8: a and b float8_e4m3fn or float8_e5m2 (either mix), d and bias bf16 or fp32, and the product is multiplied by
    a_scale and b_scale, fp32 (1,) on the device (read when the matmul runs: they can change under a CUDA graph).
    Hopper's FP8 kernels take A transposed and B not (both K-major): trans_a=True, trans_b=False only.

    The first call for a shape times the heuristic's candidate algorithms on its operands and keeps the fastest (the
    first candidate is not always it: BENCHMARKS.md, "Design measurements quoted from the code"). That call must not
    be inside a CUDA graph capture, where nothing can be timed; the model's first micro-batch runs eagerly, for this
    among others.
    """
    _load()
    fp8 = a.dtype in FP8
    if fp8:
        assert b.dtype in FP8 and d.dtype in (torch.bfloat16, torch.float32) and trans_a and not trans_b
        assert a_scale is not None and b_scale is not None
    else:
        assert b.dtype == a.dtype and d.dtype in (a.dtype, torch.float32) and a_scale is None and b_scale is None
    assert all(t is None or t.dtype == d.dtype for t in (bias, aux, c))
    adds_c, c = c is not None, d if c is None else c  # without C, beta = 0 and cuBLASLt reads nothing at D
    alignments = {"a": _alignment(a), "b": _alignment(b), "c": _alignment(c), "d": _alignment(d)}
    tf32 = a.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32  # as torch's own fp32 matmuls
    fast_accum = fp8 and fast_accum
    key = (a.dtype, b.dtype, d.dtype, tf32, fast_accum, m, n, k, trans_a, trans_b, lda, ldb, ldd, epilogue, adds_c,
           tuple(alignments.values()))
    if key not in _plans:
        _plans[key] = _plan(a.dtype, b.dtype, d.dtype, tf32, fast_accum, m, n, k, trans_a, trans_b, lda, ldb, ldd,
                            epilogue, alignments)
    plan = _plans[key]
    desc, a_layout, b_layout, d_layout, algo = plan
    setter = _lib.cublasLtMatmulDescSetAttribute
    if fp8:  # per call, like the bias: each operand has its own scale
        _set(setter, desc, _DESC_A_SCALE_POINTER, ctypes.c_void_p(a_scale.data_ptr()))
        _set(setter, desc, _DESC_B_SCALE_POINTER, ctypes.c_void_p(b_scale.data_ptr()))
    if bias is not None:  # the pointers change from call to call (a bias per layer): set on the cached descriptor
        _set(setter, desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
    if aux is not None:
        _set(setter, desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux.data_ptr()))
        _set(setter, desc, _DESC_AUX_LD, ctypes.c_int64(aux_ld))
    stream = torch.cuda.current_stream(d.device).cuda_stream
    if stream not in _workspace:  # one per stream: matmuls on two streams run at the same time
        _workspace[stream] = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=d.device)
    workspace = _workspace[stream].data_ptr()
    beta = _ONE if adds_c else _ZERO

    def launch(algo):
        _check(_lib.cublasLtMatmul(_handle, desc, ctypes.byref(_ONE), a.data_ptr(), a_layout, b.data_ptr(), b_layout,
                                   ctypes.byref(beta), c.data_ptr(), d_layout, d.data_ptr(), d_layout,
                                   ctypes.byref(algo), workspace, _WORKSPACE_BYTES, stream),
               f"cublasLtMatmul ({epilogue}, m={m} n={n} k={k})")

    if isinstance(algo, list):  # the candidates: not yet chosen
        if torch.cuda.is_current_stream_capturing():
            if len(algo) > 1 and TIME_ALGORITHMS:
                raise CublasLtError("cuBLASLt: a matmul's first call is inside a CUDA graph capture; run it once "
                                    "eagerly")
            plan[4] = algo = algo[0]
        else:
            d_before = d.clone() if c is d and adds_c else None  # trying and timing add to D again and again
            algo = _launchable(algo, launch)
            if not algo:
                raise CublasLtError(f"cuBLASLt: none of the heuristic's algorithms launches for the {epilogue} "
                                    f"epilogue with m={m} n={n} k={k} {a.dtype} x {b.dtype} -> {d.dtype}")
            plan[4] = algo = _fastest(algo, launch) if len(algo) > 1 and TIME_ALGORITHMS else algo[0]
            if d_before is not None:
                d.copy_(d_before)
    launch(algo)
