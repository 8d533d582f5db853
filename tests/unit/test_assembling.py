"""When a study is complete, and what an instance that arrives after processing does (``late_instances``).

The assembler's ``tick(now=...)`` runs at the times the test chooses; instances are received with the
node's own index and spool (no network), at the injected clock's time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from db.models import JobState, StudyState
from tests.support.node_parts import STABLE_AFTER_S, Clock, NodeParts, build_node, ct_study, make_config


def test_a_study_becomes_a_job_only_after_it_was_quiet_for_stable_after_s(node: NodeParts) -> None:
    slices = ct_study(4)
    node.receive(slices[:2])
    assert node.assembler.tick(now=node.clock.advance(STABLE_AFTER_S - 1)) == []
    # The assembler's loop waits until then, not until its next poll.
    assert node.assembler.next_due_s == pytest.approx(1)
    node.receive(slices[2:])  # the scanner is still sending: the quiet time starts again
    assert node.assembler.tick(now=node.clock.advance(STABLE_AFTER_S - 1.5)) == []
    assert node.assembler.next_due_s == pytest.approx(1.5)

    (created,) = node.assembler.tick(now=node.clock.advance(2))
    assert node.assembler.next_due_s is None  # no study left to wait for

    assert (created.study_instance_uid, created.route, created.pipeline) == (
        slices[0].StudyInstanceUID,
        "ct",
        "thumbnail",
    )
    (job,) = node.jobs()
    assert (job.state, job.destinations, job.sender_ae) == (JobState.QUEUED, ["pacs"], "CT1")
    assert node.study(slices[0].StudyInstanceUID).state == StudyState.QUEUED


@pytest.mark.parametrize(
    ("policy", "versions", "jobs"),
    [("ignore", [1], 1), ("new-version", [1, 2], 2)],
    ids=["ignore", "new-version"],
)
def test_an_instance_after_processing_is_kept_and_opens_a_new_version_only_when_configured(
    tmp_path: Path, clock: Clock, policy: str, versions: list[int], jobs: int
) -> None:
    node = build_node(tmp_path, clock, make_config(tmp_path, node={"late_instances": policy}))
    first, late = ct_study(4)[:3], ct_study(1)[0]
    study_uid = first[0].StudyInstanceUID
    node.processed_study(first)
    assert node.study(study_uid).state == StudyState.PROCESSED

    (outcome,) = node.receive([late], calling_ae="CT2")
    node.assembler.tick(now=node.clock.advance(STABLE_AFTER_S + 1))
    node.assembler.tick(now=node.clock.advance(86400))  # a day later: still nothing more

    # Kept either way: the row (the study counts it) and the file in the spool.
    late_row = next(i for i in node.instances() if i.sop_instance_uid == late.SOPInstanceUID)
    assert node.spool.abspath(late_row.path).is_file()
    assert node.study(study_uid).instance_count == 4
    assert (outcome.ignored_late, outcome.new_version) == (policy == "ignore", policy == "new-version")
    assert sorted(j.study_version for j in node.jobs()) == versions
    assert len(node.jobs()) == jobs
    study = node.study(study_uid)
    assert study.version == versions[-1]
    if policy == "ignore":
        # Nothing re-opened: the study stays processed, its sender the first one.
        assert (study.state, study.sender_ae, late_row.study_version) == (StudyState.PROCESSED, "CT1", 1)
    else:
        assert (study.state, study.sender_ae, late_row.study_version) == (StudyState.QUEUED, "CT2", 2)


def test_the_assembler_loop_steps_again_when_a_study_is_due_not_only_at_its_next_poll() -> None:
    from node.loops import Loop
    from tests.support.waiting import wait_for

    steps: list[int] = []
    loop = Loop("assembler-test", lambda: steps.append(1), 60.0, due_in=lambda: 0.05)
    loop.start()
    try:
        # With a 60 s poll, three steps would take two minutes; the study due in 50 ms brings them at once.
        wait_for(lambda: len(steps) >= 3, timeout_s=30, what="three steps of the loop")
    finally:
        loop.stop()
