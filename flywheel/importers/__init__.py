"""Importers for what a hosted-platform user can still download, one module per platform object.

    from flywheel.importers.completions import import_completions_file, import_completions_api
    result = import_completions_file(store, "stored.jsonl")          # -> captures (flywheel.proxy.captures)

`pages` holds what they share: the one page walker (`{"object": "list", "data": [...], "has_more",
"last_id"}` pages, from a file or the openai SDK) and the one JSON-shape checker. A bad download is
one `PlatformImportError` line naming the file, line and field, and nothing of it is stored.
`prompts`: prompt objects' versions -> stored prompts an eval spec names (`prompt: {id, version}`);
`jobs`: a fine-tuning job's result file (metrics CSV). Eval definitions and the fine-tuning job
itself are imported by flywheel.api.convert (`import openai-eval`, `import openai-job`, which reads
the result file through `jobs`).
"""
