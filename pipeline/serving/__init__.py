"""Serving: `export` (SavedModels for TF Serving: signatures, versions, model card),
`predict` (classify files through an export, as the server would) and `latency`
(time an export's signatures)."""
