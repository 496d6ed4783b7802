"""The multi-model matrix: plan, scheduler, results store, exports. No UI imports here."""
