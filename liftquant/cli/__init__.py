"""Layer 2, the command-line vocabulary: the flat, validated, versioned dataclasses every entry
script parses (:mod:`.config`: ``RunConfig`` and the shared ``DeviceArgs`` / ``KernelArgs`` /
``EvalArgs`` groups, every flag and alias) and the fine-tuning flags (:mod:`.finetune_config`).
It is parsed before anything heavy, so it imports no torch: only :mod:`liftquant.util` and the
torch-free lattice names of :mod:`liftquant.core.latticespec`. The pipeline below the apps reads
these dataclasses; the steps that act on them are :mod:`liftquant.apps`."""
