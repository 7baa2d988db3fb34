"""The schemas of the ``sn_cuda::`` ops: the contract between ``sn_cuda/ops.py``, which defines
the ops, and the compiled kernels (``csrc/``), which register implementations whose C++
signatures must match them.

A build is stamped with their fingerprint (setup.py writes ``<module file>.schemas`` next to
the module, e.g. ``_C.cpython-311-x86_64-linux-gnu.so.schemas``: one per Python), and ``sn_cuda/_extension.py`` loads only a build whose stamp matches: a module built from
other schemas (an in-place build left behind by a ``git pull``) cannot be loaded safely. Its
registrations make the definitions in ops.py fail, or, loaded after them, abort the process.
Plain Python with no imports of its own: setup.py reads it without importing sn_cuda.
"""

import hashlib

SCHEMAS = (
    "power_iteration(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, SymInt[] dims, "
    "bool u_first, SymInt n_power_iterations, float eps, bool training) -> (Tensor, Tensor)",
    "normalize(Tensor[] weights, Tensor sigmas, Tensor uv, SymInt[] dims) -> (Tensor[], Tensor)",
    "normalize_backward(Tensor[] grads, Tensor? grad_sigmas, Tensor[] w_sn, Tensor sigmas, "
    "Tensor uv, SymInt[] dims) -> Tensor[]",
    "spectral_norm(Tensor[] weights, Tensor(a!)[] us, Tensor(b!)[] vs, SymInt[] dims, "
    "bool u_first, SymInt n_power_iterations, float eps, bool training) -> (Tensor[], Tensor)",
)

# A module's stamp: its own file name with this suffix, next to it.
STAMP_SUFFIX = ".schemas"


def fingerprint() -> str:
    return hashlib.sha256("\n".join(SCHEMAS).encode()).hexdigest()[:16]
