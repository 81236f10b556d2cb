"""Privacy of captured data: PII redaction (`redact`), deletion with lineage (`deletion`), retention
(`retention`) and the proxy's output policy (`policy`). See docs/privacy.md."""
