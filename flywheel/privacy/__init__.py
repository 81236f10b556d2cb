"""Privacy of captured data (docs/privacy.md): PII redaction (`redact`), copies of captures and
their lineage (`lineage`, `exports`), deletion with lineage (`deletion`), retention (`retention`)
and the proxy's settings and output screen (`policy`). Detection lives in `graders.pii`."""
