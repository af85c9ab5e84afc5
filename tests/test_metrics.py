"""One progress display (trainers/metrics.py): plain periodic lines in a log, a live bar only on a
terminal, and metrics.jsonl that always reads as one uninterrupted run."""
import json
import sys

from trainers.metrics import MetricsWriter


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
