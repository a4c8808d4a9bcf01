"""Studio jobs: a job whose steps run in this studio is never shown as lost between or after its steps (the
page stops polling a lost job, so a moment's "lost" froze it), and is lost once its studio and step are gone."""

import json
import sys
import time

from instructkit.studio import children


def test_a_job_is_running_until_it_completes_and_lost_only_without_its_studio(tmp_path):
    quick = [sys.executable, "-c", "pass", "x", "y"]  # argv[3:] is what the log shows
    steps = [("first", quick), ("second", quick), ("third", quick)]
    children.start_job(tmp_path, "merge", steps, None)
    seen = []
    deadline = time.time() + 60
    while time.time() < deadline:
        status = children.read_job(tmp_path, "merge")["status"]
        seen.append(status)
        if status != "running":
            break
    assert seen[-1] == "completed" and set(seen) <= {"running", "completed"}, set(seen)
    state_path, _ = children.job_paths(tmp_path, "merge")
    state = json.loads(state_path.read_text())
    state.update(status="running", runner=2**22 + 1, pid=2**22 + 2)  # no such processes: the studio stopped
    state_path.write_text(json.dumps(state))
    assert children.read_job(tmp_path, "merge")["status"] == "lost"
