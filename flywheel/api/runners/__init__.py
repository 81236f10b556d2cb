"""What the API's queued jobs run: `eval_runs` (an eval run through the harness), `fine_tuning` (a
job through `flywheel.train.run`), `wheel_runs` (`flywheel.wheel.run_wheel`), and `workers`, the queue's
workers as processes. Runners never import routes."""
