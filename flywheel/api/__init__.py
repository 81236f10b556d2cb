"""`flywheel serve --api`: the hosted platform's Files, Evals and Fine-tuning REST API over the store.

Code written against the official `openai` SDK points its `base_url` here and keeps working:

    client = openai.OpenAI(base_url="http://127.0.0.1:8765/v1", api_key="unused-on-loopback")
    f = client.files.create(file=open("items.jsonl", "rb"), purpose="evals")
    ev = client.evals.create(name="x", data_source_config={...}, testing_criteria=[...])
    run = client.evals.runs.create(ev.id, data_source={"type": "completions", ...})

Modules: `app` wires the routes; `files`, `evals` (+ `eval_runs`, what a run executes, and `logs`,
runs over stored completions), `fine_tuning` (+ `fine_tuning_runner`, what a job trains),
`graders_api`, `chat` and `wheel_runs` hold the endpoints; `jobs` is the queue that runs work in
the server; `access` checks API keys, projects and roles, `limits` rate-limits them, `scoped`
reads objects as a project sees them; `errors` is the platform's error JSON, `pagination` its
cursor lists and `convert` moves definitions without the API.
"""
