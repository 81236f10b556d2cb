"""What a wheel run job runs: `flywheel.wheel.run_wheel` on the run spec the route wrote
(flywheel.api.routes.wheel_runs), under the run id chosen before it starts, so a run that a dead
server left resumes where it stopped."""

from __future__ import annotations

import json
from typing import Any

from flywheel.api.jobs import JobContext
from flywheel.api.runners.eval_runs import local_turn
from flywheel.events import Throttle, WheelEvent
from flywheel.run_spec import load_run_spec
from flywheel.store import Store, new_id
from flywheel.wheel import WheelState, run_wheel

EVENTS_EVERY_S = 5.0  # a run object's progress events (items, training steps) at most this often per kind


class WheelRunner:
    """Runs `wheel_run` jobs with `flywheel.wheel.run_wheel`, resuming a run a dead server left."""

    def run(self, ctx: JobContext) -> None:
        store = ctx.store
        row = store.api_get("api_wheel_runs", ctx.job["object_id"])
        if row["run_id"] is None:  # the wheel run's id, chosen here and kept before it runs
            row["run_id"] = new_id("run")
            store.api_update("api_wheel_runs", row["id"], run_id=row["run_id"])
        stored = store.find_run(row["run_id"])
        store.api_update("api_wheel_runs", row["id"], status="running")
        ctx.event(f"Wheel run {'resumed' if stored else 'started'}.")

        throttle = Throttle(EVENTS_EVERY_S)

        def on_event(event: WheelEvent) -> None:
            # Every line and stage boundary is an event; the steps inside a stage (items evaluated,
            # training steps with their loss) at most one per EVENTS_EVERY_S. Cancel is checked at
            # each (not inside a training step: the job stops at its next evaluation or stage).
            if throttle.passes(event):
                ctx.event(event.line(), type=f"wheel.{event.kind}", data=event.model_dump(mode="json"))
            if event.kind != "train":
                ctx.check()

        if stored and stored["status"] == "completed":  # finished before the server stopped: read it back
            result = store.run_state(row["run_id"], WheelState).result or {}
        else:
            with local_turn(store):
                result = run_wheel(load_run_spec(row["spec_path"]), store, run_id=row["run_id"],
                                   command=f"api:{row['id']}", on_event=on_event,
                                   report_dir=str(store.artefact_dir / "reports")).to_dict()
        summary = {key: result.get(key) for key in ("run_id", "stopped", "baseline_valid", "winner_valid",
                                                     "winner_model", "winner_prompt_id", "test")}
        summary["stages"] = [{key: o.get(key) for key in ("stage", "decision", "reason", "valid")}
                             for o in result.get("stages") or []]
        summary["report_path"] = result.get("report_path")
        store.api_update("api_wheel_runs", row["id"], result_json=json.dumps(summary, default=str))

    def settle(self, store: Store, job: dict[str, Any], status: str, error: str | None) -> None:
        if store.api_get("api_wheel_runs", job["object_id"]) is None:
            return
        fields: dict[str, Any] = {"status": status}
        if error:
            fields["error_json"] = json.dumps({"code": "run_failed", "message": error})
        store.api_update("api_wheel_runs", job["object_id"], **fields)
        store.add_api_event(job["object_id"], f"Wheel run {status}." + (f" {error}" if error else ""),
                            level="error" if error else "info")
