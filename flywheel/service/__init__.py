"""The service that turns the wheel by itself (issue 28): `flywheel serve --flywheel service.yaml`.

    spec.py      service.yaml (`ServiceSpec`)
    aliases.py   `production` / `candidate` -> (model, prompt): switch, promote, reject, rollback
    serving.py   the alias model server (apps call the alias name; the store says what answers)
    shadow.py    shadow and canary: live pairs graded online, the always-valid sequential rule
    laps.py      a lap: new captures -> training set -> train.run -> offline gate -> candidate
    run.py       the one process group: proxy, alias server, API + review app, shadow, scheduler
"""
