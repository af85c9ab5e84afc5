"""One progress display (trainers/metrics.py): plain periodic lines in a log, a live bar only on a
terminal, and metrics.jsonl that always reads as one uninterrupted run."""
import json
import sys

from trainers.metrics import MetricsWriter, Progress


def test_a_log_gets_plain_lines_with_progress_and_no_bar(tmp_path, capsys):
  writer = MetricsWriter(str(tmp_path), start_step=0, total_steps=4)
  for step in range(1, 5):
    writer.advance()
    if step % 2 == 0:
      writer.write(step, {'loss': 1.0 / step})
      writer.advance(0, loss=1.0 / step)
  writer.close()
  captured = capsys.readouterr()
  lines = captured.out.strip().split('\n')
  assert len(lines) == 2 and lines[0].startswith('step 2/4 (50%,') and 'ETA' in lines[0]
  assert lines[1].startswith('step 4/4 (100%,') and 'loss 0.25' in lines[1]
  assert '\r' not in captured.out + captured.err and 'it/s' not in captured.err  # no bar


def test_a_terminal_gets_the_live_bar(tmp_path, monkeypatch):
  monkeypatch.setattr(sys.stderr, 'isatty', lambda: True, raising=False)
  writer = MetricsWriter(str(tmp_path), start_step=0, total_steps=4)
  assert not writer._bar.disable
  writer.close()


def test_a_long_eval_pass_shows_periodic_lines_in_a_log_and_a_bar_on_a_terminal(
    capsys, monkeypatch):
  every = Progress('arc_easy', 10, 'continuations', every_s=0.0)
  for _ in range(5):
    every.update(2)
  every.close()
  sparse = Progress('piqa', 10, 'continuations', every_s=3600.0)
  for _ in range(5):
    sparse.update(2)  # only the last update prints: the hour between lines has not passed
  sparse.close()
  captured = capsys.readouterr()
  lines = captured.err.strip().split('\n')
  assert captured.out == '' and len(lines) == 6, lines
  assert lines[0].startswith('arc_easy: 2/10 continuations (20%,') and 'ETA' in lines[0]
  assert lines[4].startswith('arc_easy: 10/10 continuations (100%,')
  assert lines[5].startswith('piqa: 10/10 continuations (100%,')
  assert '\r' not in captured.err  # no bar
  monkeypatch.setattr(sys.stderr, 'isatty', lambda: True, raising=False)
  live = Progress('hellaswag', 4, 'continuations')
  assert not live._bar.disable
  live.close()


def test_a_resumed_run_drops_the_records_after_its_checkpoint(tmp_path):
  writer = MetricsWriter(str(tmp_path), start_step=0, total_steps=4)
  for step in (1, 2, 3):
    writer.write(step, {'loss': float(step)})
  writer.close()
  writer = MetricsWriter(str(tmp_path), start_step=2, total_steps=4)  # resumed from step 2
  writer.write(3, {'loss': 30.0})
  writer.close()
  with open(tmp_path / 'metrics.jsonl') as f:
    assert [json.loads(line) for line in f] == [
        {'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 2.0}, {'step': 3, 'loss': 30.0}]
