"""`flywheel serve --api`: the hosted platform's Files, Evals and Fine-tuning REST API over the store.

Code written against the official `openai` SDK points its `base_url` here and keeps working:

    client = openai.OpenAI(base_url="http://127.0.0.1:8765/v1", api_key="unused-on-loopback")
    f = client.files.create(file=open("items.jsonl", "rb"), purpose="evals")
    ev = client.evals.create(name="x", data_source_config={...}, testing_criteria=[...])
    run = client.evals.runs.create(ev.id, data_source={"type": "completions", ...})

Rooms (the contract in pyproject.toml holds them: app -> routes -> runners -> the shared parts):
`app` wires the routes and the workers, `state` is what every route shares; `routes/` holds the
endpoints (`files`, `evals`, `fine_tuning`, `graders`, `chat`, `wheel_runs`); `runners/` what the
queued jobs run (`eval_runs`, `fine_tuning`, `wheel_runs`) and the `workers` as processes; `platform`
maps the platform's model names to ours, `convert` its eval and job definitions (without the API).
Shared parts: `jobs` is the queue that runs work in the server, `logs` runs over stored completions,
`access` checks API keys, projects and roles, `limits` rate-limits them, `scoped` reads objects as a
project sees them, `errors` is the platform's error JSON and `pagination` its cursor lists.
"""
