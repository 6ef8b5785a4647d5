"""Layer 1, the math of SPEC §1 as pure functions over tensors: lattice names and shipped files
(:mod:`.latticespec`, no torch), the matrix M and the nearest-code search (:mod:`.lattice`,
paper Eq. 1) and its training (:mod:`.lattice_train`), Hadamard bases (:mod:`.hadamard`), the
whitening transform T (:mod:`.whiten`, Eq. 2), the STE proxy quantizer (:mod:`.proxy`, Eq. 3),
the one bit layout (:mod:`.pack`) and the two layer forms ``LiftLinear`` / ``PackedLiftLinear``
(:mod:`.linear`), and the per-matrix math of the RTN and GPTQ baselines (:mod:`.baseline_math`).
It may import :mod:`liftquant.util` and the kernel backends
(:mod:`liftquant.kernels`, same layer) at top level; never the pipeline, the checkpoint format
or the apps. The Triton/torch search kernels that :func:`.lattice.encode` dispatches to live in
:mod:`liftquant.kernels.search` and are imported inside functions."""
