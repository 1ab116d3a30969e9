"""Fleet audit: ask every device's agent for its findings and compare configured,
effective and recommended backends (rules: ``docs/audit-rules.md``)."""
