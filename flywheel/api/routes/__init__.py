"""The API's HTTP routes, one module per platform resource: `files`, `evals`, `fine_tuning`,
`graders` (the alpha grader endpoints), `chat` and `wheel_runs` (Flywheel's own `/v1/flywheel/runs`).
A route parses the request, checks the caller, reads or writes the store and queues work for a
runner (flywheel.api.runners); it never runs an eval or trains itself."""
