"""The Label Studio adapters: API client, labeling config, label mirror, resync, media and its SSRF guard."""
