"""Compare runs: a table of their final metrics and eval results, and plots of their curves.

  python -m eval.compare runs/sweep/* [--out=runs/sweep/compare] [--metrics=loss,eval_loss]

For each workdir: its last step, the last value of every metric its metrics.jsonl logs, and
every number in its eval_*.json files (eval.accuracy, eval.perplexity, eval.reward,
eval.benchmarks: nested keys joined with '.'). Prints the table as Markdown and writes it to
OUT/compare.md and OUT/compare.csv; writes OUT/<metric>.png for each metric the runs log (or
those --metrics names), one line per run against the step (matplotlib, no display needed).
Columns a run lacks are empty. launch.sweep ends with this table for its points.
"""
import csv
import glob
import json
import math
import os
import sys

from trainers.metrics import read_metrics

SKIP_CURVES = {'step', 'lr'}


def flatten(obj, prefix='') -> dict:
  """The numbers of a nested JSON object, keyed by their dotted paths."""
  out = {}
  if isinstance(obj, dict):
    for k, v in obj.items():
      out.update(flatten(v, f'{prefix}{k}.'))
  elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
    out[prefix[:-1]] = obj
  return out


def summarize(workdir: str) -> dict:
  """One row: name, last step, last value of each logged metric, every eval number."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'{workdir} is not a directory')
  row = {'run': os.path.basename(os.path.normpath(workdir))}
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    records = read_metrics(path)
    if records:
      row['step'] = records[-1].get('step')
    for record in records:  # the last value of each key, wherever it was logged
      row.update({k: v for k, v in record.items() if k != 'step' and _is_number(v)})
  for name in sorted(glob.glob(os.path.join(workdir, 'eval_*.json'))):
    stem = os.path.basename(name)[len('eval_'):-len('.json')]
    with open(name) as f:
      row.update({f'{stem}.{k}': v for k, v in flatten(json.load(f)).items()
                  if not k.endswith('seconds')})
  return row


def curves(workdir: str) -> dict[str, tuple[list, list]]:
  """Metric -> (steps, values): metrics.jsonl's, and the per-checkpoint evals of
  eval_<name>_steps.jsonl (eval.benchmarks --all_steps) as '<name>.<key>'."""
  out = {}

  def add(records, prefix=''):
    for record in records:
      for k, v in flatten(record).items():
        if k not in SKIP_CURVES and 'step' in record and not k.endswith('seconds') and \
            not k.endswith('.n') and not k.endswith('.shots') and _is_number(v):
          xs, ys = out.setdefault(prefix + k, ([], []))
          xs.append(record['step'])
          ys.append(v)
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    add(read_metrics(path))
  for name in sorted(glob.glob(os.path.join(workdir, 'eval_*_steps.jsonl'))):
    stem = os.path.basename(name)[len('eval_'):-len('_steps.jsonl')]
    add(read_metrics(name), f'{stem}.')
  return out


def table(rows: list[dict], columns: list[str] | None = None) -> tuple[list[str], str]:
  """(columns, Markdown table) of the rows; columns default to run, step, metrics, eval numbers."""
  columns = columns or ['run'] + sorted({k for r in rows for k in r} - {'run'},
                                        key=lambda k: (k != 'step', '.' in k, k))
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for r in rows:
    lines.append('| ' + ' | '.join(_fmt(r.get(c)) for c in columns) + ' |')
  return columns, '\n'.join(lines)


def write_table(rows: list[dict], path_stem: str, columns: list[str] | None = None) -> str:
  """The table as PATH_STEM.md and PATH_STEM.csv; returns the Markdown."""
  columns, markdown = table(rows, columns)
  with open(path_stem + '.md', 'w') as f:
    f.write(markdown + '\n')
  with open(path_stem + '.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  return markdown


def plot(workdirs: list[str], out: str, metrics: list[str] | None = None) -> list[str]:
  """One PNG per metric with a line per run; returns the files written."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  runs = {os.path.basename(os.path.normpath(w)): curves(w) for w in workdirs}
  names = metrics or sorted({k for c in runs.values() for k in c})
  written = []
  for metric in names:
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for run, c in runs.items():
      if metric in c:
        ax.plot(*c[metric], label=run, marker='.' if len(c[metric][0]) < 30 else None)
        drawn += 1
    if not drawn:
      plt.close(fig)
      continue
    ax.set_xlabel('step')
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, f'{metric.replace("/", "_")}.png')
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
  return written


def compare(workdirs: list[str], out: str, metrics: list[str] | None = None) -> dict:
  if not workdirs:
    raise ValueError('no workdirs to compare')
  rows = [summarize(w) for w in workdirs]
  os.makedirs(out, exist_ok=True)
  markdown = write_table(rows, os.path.join(out, 'compare'))
  return {'rows': rows, 'markdown': markdown, 'plots': plot(workdirs, out, metrics)}


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v) -> str:
  if v is None:
    return ''
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)


def main(argv=None):
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument('--out', default=None, help='where the table and plots go (default: '
                      'compare/ beside the first workdir)')
  parser.add_argument('--metrics', default='', help='comma-separated curves to plot (default: '
                      'all logged)')
  args = parser.parse_args(argv)
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.workdirs[0])), 'compare')
  try:
    result = compare(args.workdirs, out, [m for m in args.metrics.split(',') if m] or None)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  print(result['markdown'])
  print(f'\nwrote {out}/compare.md, compare.csv and {len(result["plots"])} plots')


if __name__ == '__main__':
  main()
