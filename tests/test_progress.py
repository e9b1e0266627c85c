"""Progress off a terminal (Prefect workers, CI): a start line, periodic lines with rate and ETA, an end line."""

from tasks import progress
from tasks.progress import StageProgress


def test_off_a_terminal_progress_is_a_few_plain_lines(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)  # a line per advance, to see each one
    with StageProgress("fine_tune", 4, "steps", rate_unit="pairs") as bar:
        bar.advance(1, rated=16, loss=0.6931)
        bar.advance(3, rated=48, loss=0.5)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "fine_tune: 4 steps to go"
    assert lines[1].startswith("fine_tune: 1/4 steps (25%, ETA ")
    assert "pairs/s" in lines[1] and "loss 0.6931" in lines[1]
    assert lines[-1].startswith("fine_tune: 4/4 steps (done in ") and "loss 0.5000" in lines[-1]


def test_periodic_lines_wait_for_the_interval(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 3600.0)
    with StageProgress("rerank: score users", 100, "users") as bar:
        for _ in range(100):
            bar.advance(1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[-1].startswith("rerank: score users: 100/100 users (done in ")
