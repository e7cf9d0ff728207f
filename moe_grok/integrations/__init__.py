"""Integrations with other frameworks' training loops (optional extras; nothing here is imported by
the rest of moe_grok): `hf_probes` runs a transformers MoE model over a monitor's probe sets,
`hf_trainer` is the transformers Trainer callback (docs/integrations.md)."""
