"""Layer 0, base utilities: logging (:mod:`.log`), atomic file writes (:mod:`.fileio`), the
one-line error reports of the entry scripts (:mod:`.errors`), result-row CSV merging
(:mod:`.records`) and the source provenance of results (:mod:`.provenance`, also
``python -m liftquant.util.provenance``). Nothing here imports torch or transformers at import
time. Its modules import only each other and the standard library at top level; the error
reports reach the demo assets and token data through imports inside functions."""
