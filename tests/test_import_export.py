"""Importing Hugging Face and GGUF checkpoints, exporting back (launch/import_checkpoint.py,
launch/export_checkpoint.py). Reference models are random transformers models built locally."""
import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import nnx

from configs.base import DEFAULT_SHARDING_RULES
from data.hf_tokenizer import HFTokenizer
from data.tokenizer import load_tokenizer
from launch import gguf_weights, hf_weights
from launch.export_checkpoint import export_hf
from launch.import_checkpoint import import_checkpoint, read_source
from models.checkpoint import load_model
from models.sharding import make_mesh

VOCAB = 64
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant{% endif %}")
TOKENS = np.array([[1, 5, 9, 33, 2, 60, 17, 4, 8, 42, 11, 3]])


def _write_tokenizer(directory):
  """A word-level tokenizer.json with a chat template, standing in for a real checkpoint's."""
  words = ['<unk>', '<s>', '</s>', 'user', 'assistant', 'hello', 'world'] + [f'w{i}'
                                                                              for i in range(40)]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(words)}, unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(['<s>', '</s>'])
  tok.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump({'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>',
               'chat_template': TEMPLATE}, f)


def _hf_model(directory, kind):
  torch.manual_seed(0)
  if kind == 'qwen2':  # q/k/v biases, tied embeddings.
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **SHAPE, tie_word_embeddings=True, rope_theta=1e4))
  elif kind == 'llama31':  # Llama 3.1's frequency-dependent RoPE scaling.
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SHAPE, rope_parameters=dict(rope_type='llama3', rope_theta=5e5, factor=4.0,
                                      low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=16)))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SHAPE, tie_word_embeddings=kind == 'llama_tied', rope_theta=5e5))
  with torch.no_grad():  # Random norms and biases, so a misplaced one shows in the logits.
    for name, p in model.named_parameters():
      if name.endswith(('norm.weight', 'bias')):
        p.copy_(1 + 0.2 * torch.randn_like(p) if 'norm' in name else 0.2 * torch.randn_like(p))
  model.save_pretrained(directory)
  _write_tokenizer(directory)
  return model.eval()


def _torch_logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _our_logits(model, tokens=TOKENS):
  return np.asarray(model(jnp.asarray(tokens)))


def _flat_params(model):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize('kind', ['llama', 'qwen2', 'llama_tied', 'llama31'])
def test_hf_import_matches_transformers_logits(tmp_path, kind):
  ref = _hf_model(tmp_path / 'hf', kind)
  import_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'run'))
  model, step = load_model(str(tmp_path / 'run'), dtype='float32')
  assert step == 0 and model.cfg.qkv_bias == (kind == 'qwen2')
  assert model.cfg.tie_embeddings == (kind in ('qwen2', 'llama_tied'))
  assert (model.cfg.rope_scaling is not None) == (kind == 'llama31')
  np.testing.assert_allclose(_our_logits(model), _torch_logits(ref), atol=1e-4, rtol=1e-4)

  tok = load_tokenizer(str(tmp_path / 'run'))
  assert tok.encode('hello world', bos=True) == [1, 5, 6]
  assert tok.apply_chat_template([{'role': 'user', 'content': 'hello'}]) == [1, 3, 5, 2, 1, 4]
  with open(tmp_path / 'run' / 'config.json') as f:
    assert json.load(f)['model']['d_model'] == 32


def test_import_places_each_tensor_on_the_mesh(tmp_path):
  ref = _hf_model(tmp_path, 'qwen2')
  cfg, tensors, _ = read_source(str(tmp_path))
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  model = hf_weights.load_params(dataclasses.replace(cfg, dtype='float32'), tensors, mesh=mesh,
                                 rules=DEFAULT_SHARDING_RULES)
  wq = model.layers[0].attn.wq.kernel[...]
  assert tuple(wq.sharding.spec) == ('fsdp', 'tensor') and len(wq.addressable_shards) == 8
  np.testing.assert_allclose(_our_logits(model), _torch_logits(ref), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('kind', ['llama', 'qwen2', 'llama31'])
def test_export_round_trips_and_loads_in_transformers(tmp_path, kind):
  _hf_model(tmp_path / 'hf', kind)
  import_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'run'))
  # A small shard limit forces a sharded export (index + several files), read back on re-import.
  out = export_hf(str(tmp_path / 'run'), str(tmp_path / 'out'), max_shard_bytes=40_000)
  assert os.path.exists(os.path.join(out, 'model.safetensors.index.json'))
  import_checkpoint(out, str(tmp_path / 'again'))
  first, _ = load_model(str(tmp_path / 'run'), dtype='float32')
  second, _ = load_model(str(tmp_path / 'again'), dtype='float32')
  a, b = _flat_params(first), _flat_params(second)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

  exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_allclose(_torch_logits(exported), _our_logits(first), atol=1e-4, rtol=1e-4)
  # (AutoTokenizer would rebuild a qwen2 tokenizer as Qwen's BPE, which this word-level one is not.)
  hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(out)
  assert hf_tok('hello world', add_special_tokens=False)['input_ids'] == [5, 6]
  assert hf_tok.chat_template == TEMPLATE


def _llama_cpp_permute(w, n_heads):
  """What llama.cpp's converter does to Q/K rows: interleave each head's two rotary halves."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).swapaxes(1, 2).reshape(
      w.shape)


def test_unpermute_rows_inverts_llama_cpp():
  w = np.arange(24 * 3).reshape(24, 3)
  assert np.array_equal(_llama_cpp_permute(w, 3)[gguf_weights.unpermute_rows(24, 3)], w)


def test_gguf_import_matches_transformers_logits(tmp_path):
  """A float32 GGUF written as llama.cpp would (permuted Q/K) imports to transformers' logits."""
  import gguf
  ref = _hf_model(tmp_path / 'hf', 'llama')
  c = ref.config
  writer = gguf.GGUFWriter(str(tmp_path / 'm.gguf'), 'llama')
  writer.add_block_count(c.num_hidden_layers)
  writer.add_context_length(c.max_position_embeddings)
  writer.add_embedding_length(c.hidden_size)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_head_count(c.num_attention_heads)
  writer.add_head_count_kv(c.num_key_value_heads)
  writer.add_rope_freq_base(5e5)
  writer.add_layer_norm_rms_eps(c.rms_norm_eps)
  tokens = [f'<t{i}>' for i in range(VOCAB - 1)] + ['<t1><t2>']
  writer.add_tokenizer_model('gpt2')
  writer.add_token_list(tokens)
  writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (VOCAB - 3))
  writer.add_token_merges(['<t1> <t2>'])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_chat_template(TEMPLATE)
  names = {'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight':
           'output_norm.weight', 'lm_head.weight': 'output.weight'}
  for i in range(c.num_hidden_layers):
    for ours, theirs in gguf_weights._LAYER_TENSORS.items():
      names[f'model.layers.{i}.{theirs}.weight'] = f'blk.{i}.{ours}.weight'
  for name, w in ref.state_dict().items():
    w = w.numpy()
    if name.endswith(('q_proj.weight', 'k_proj.weight')):
      w = _llama_cpp_permute(w, c.num_attention_heads if 'q_proj' in name else
                             c.num_key_value_heads)
    writer.add_tensor(names[name], np.ascontiguousarray(w))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()

  cfg, tensors, tok = read_source(str(tmp_path / 'm.gguf'))
  assert (cfg.rope_theta, cfg.tie_embeddings, tok.bos_id, tok.eos_id) == (5e5, False, 1, 2)
  model = hf_weights.load_params(dataclasses.replace(cfg, dtype='float32'), tensors)
  np.testing.assert_allclose(_our_logits(model), _torch_logits(ref), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope='module')
def smollm2(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('smollm2'))
  import_checkpoint('smollm2_135m', workdir)
  return workdir


def test_smollm2_gguf_answers_a_factual_question(smollm2):
  from serving import offline
  model, _ = load_model(smollm2, dtype='float32')
  tok = load_tokenizer(smollm2)
  prompt = tok.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}])
  engine = offline.engine_for(model, [prompt], 8, tokenizer=tok)
  answer = offline.generate(engine, [prompt], max_tokens=8, eos_id=tok.eos_id)[0].text
  assert 'Paris' in answer, answer


def _our_greedy(workdir, text, n):
  from serving import offline
  from serving.engine import Engine
  engine = Engine.from_workdir(workdir, max_concurrent_decodes=1, max_len=64,
                               max_prefill_length=16)
  assert engine.cfg.dtype == 'float32'  # dtype='auto' on a CPU.
  tok = engine.tokenizer
  return tok.encode_prompt(text), offline.generate(engine, [tok.encode_prompt(text)],
                                                   max_tokens=n, eos_id=tok.eos_id)[0].tokens


def _hf_greedy(model, ids, n, eos):
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos)
  return out[0, len(ids):].tolist()


@pytest.mark.parametrize('kind', ['llama', 'qwen2'])
def test_greedy_completion_equals_transformers_generate(tmp_path, kind):
  """32 greedy tokens of an imported model (float32, KV cache) are transformers' `generate`, the
  prompt encoded as transformers encodes it: BOS from the Llama tokenizer's post-processor, none
  for the Qwen2 one."""
  ref = _hf_model(tmp_path / 'hf', kind)
  with torch.no_grad():  # Sharper logits, so that no argmax is a near-tie between frameworks.
    ref.lm_head.weight.mul_(30.0)
  ref.save_pretrained(tmp_path / 'hf')
  if kind == 'llama':
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / 'hf' / 'tokenizer.json'))
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single='<s> $A', special_tokens=[('<s>', 1)])
    tok.save(str(tmp_path / 'hf' / 'tokenizer.json'))
  import_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'run'))
  text = 'hello world w3 w17 w5'
  # transformers' generic fast tokenizer over the same tokenizer.json (AutoTokenizer would pick
  # the Qwen2 class, which cannot read this stand-in word-level tokenizer).
  hf_ids = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(tmp_path / 'hf' / 'tokenizer.json'))(text)['input_ids']
  ids, ours = _our_greedy(str(tmp_path / 'run'), text, 32)
  assert ids == hf_ids and (ids[0] == 1) == (kind == 'llama')
  assert ours == _hf_greedy(ref, hf_ids, 32, eos=2)


def test_smollm2_greedy_completion_equals_transformers_generate(smollm2):
  """The built-in SmolLM2 against transformers reading the same GGUF itself (its own
  dequantisation and tokenizer): the GGUF says add_bos_token=false, so no BOS; with one, the
  continuation of this prompt changes after a few tokens."""
  from launch.import_checkpoint import builtin_path
  path = str(builtin_path('smollm2_135m'))
  where = dict(pretrained_model_name_or_path=os.path.dirname(path),
               gguf_file=os.path.basename(path))
  hf_tok = transformers.AutoTokenizer.from_pretrained(**where)
  ref = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()
  text = 'The capital of France is'
  ids, ours = _our_greedy(smollm2, text, 32)
  assert ids == hf_tok(text)['input_ids'] and ids[0] != hf_tok.bos_token_id
  assert ours == _hf_greedy(ref, ids, 32, eos=hf_tok.eos_token_id)


def _edit_config(directory, **changes):
  path = os.path.join(directory, 'config.json')
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, 'w') as f:
    json.dump(config, f)


def test_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a Hugging Face directory, a .gguf file'):
    read_source(str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='config.json not found'):
    read_source(str(tmp_path))
  hf = str(tmp_path / 'hf')
  _hf_model(hf, 'llama')

  _edit_config(hf, architectures=['GPT2LMHeadModel'])
  with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
    read_source(hf)
  _edit_config(hf, architectures=['LlamaForCausalLM'],
               rope_parameters={'rope_type': 'yarn', 'rope_theta': 5e5, 'factor': 8.0})
  with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
    read_source(hf)
  _edit_config(hf, rope_parameters={'rope_type': 'default', 'rope_theta': 5e5},
               intermediate_size=64)
  with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' has shape "
                                       r"\(32, 48\), but the config needs \(32, 64\)"):
    import_checkpoint(hf, str(tmp_path / 'run'))
  _edit_config(hf, intermediate_size=48, tie_word_embeddings=True)
  with pytest.raises(ValueError, match=r"no place for .*\['lm_head.weight'\]"):
    import_checkpoint(hf, str(tmp_path / 'run'))

  os.remove(os.path.join(hf, 'model.safetensors'))
  with pytest.raises(FileNotFoundError, match='holds no \\*.safetensors weights'):
    read_source(hf)


def test_export_of_a_workdir_trained_here(tmp_path):
  """Our own models (sentencepiece tokenizer, no bias) export to a Llama transformers reads."""
  from data.tokenizer import save_tokenizer, train_tokenizer
  from models import checkpoint
  from models.llama import create_model
  from models.presets import PRESETS
  docs = ['Hello world, a test of the tokenizer.\n  indented code()\n', 'More: 12345   x.'] * 100
  tok = train_tokenizer(docs, vocab_size=320)
  cfg = dataclasses.replace(PRESETS['tiny'], vocab_size=320, dtype='float32')
  model = create_model(cfg, seed=0)
  os.makedirs(tmp_path / 'run')
  checkpoint.save_model_config(str(tmp_path / 'run'), cfg)
  save_tokenizer(tok, str(tmp_path / 'run'))
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'run' / 'checkpoints'), async_save=False)
  ckpt.save(7, nnx.state(model, nnx.Param))
  ckpt.close()

  out = export_hf(str(tmp_path / 'run'), str(tmp_path / 'out'))
  exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = np.array([[2, 40, 7, 319, 150, 3]])
  np.testing.assert_allclose(_torch_logits(exported, tokens), _our_logits(model, tokens),
                             atol=1e-4, rtol=1e-4)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  # Importing a sentencepiece-only HF directory converts tokenizer.model the same way.
  imported = HFTokenizer.from_pretrained_dir(out)
  assert imported.add_bos
  for text in ['Hello world', '  indented code()', 'x\n  y', '12345 é']:
    assert hf_tok(text, add_special_tokens=False)['input_ids'] == tok.encode(text)
    # transformers adds the BOS our models train with; so does a re-import.
    assert hf_tok(text)['input_ids'] == tok.encode_prompt(text) == imported.encode_prompt(text)


def test_stages_started_from_an_import_keep_its_architecture(tmp_path):
  """init_from an imported Qwen2: the stage's model keeps the q/k/v biases and norm eps of the
  checkpoint (not the preset's), and a conflicting architecture key is an error naming it."""
  from tests.helpers import tiny_config
  from trainers import common
  _hf_model(tmp_path / 'hf', 'qwen2')
  import_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'run'))
  config = tiny_config(**{'init_from': str(tmp_path / 'run'), 'data.seq_len': 32})
  cfg = common.model_config(config, VOCAB)
  assert cfg == dataclasses.replace(load_model(str(tmp_path / 'run'))[0].cfg, dtype='float32')
  assert cfg.qkv_bias and cfg.norm_eps == 1e-6
  with pytest.raises(ValueError, match='model.d_model=64'):
    common.model_config(tiny_config(**{'init_from': str(tmp_path / 'run'),
                                       'model.d_model': 64}), VOCAB)


def test_the_servers_chat_route_renders_smollm2s_own_template(smollm2):
  # /v1/chat/completions turns messages into exactly the prompt the checkpoint's own chat template
  # gives (SmolLM2's ChatML with its default system turn), and stops at its end-of-turn token.
  import types
  from serving.http_api import OpenAIServer
  tok = load_tokenizer(smollm2)
  engine = types.SimpleNamespace(tokenizer=tok, max_concurrent_decodes=1, max_prefill_length=512,
                                 max_len=1024)
  server = OpenAIServer(engine, None, model_name='smollm2')
  messages = [{'role': 'user', 'content': 'What is the capital of France?'}]
  ids, stop_ids = server._chat_prompt(messages)
  assert ids == tok.apply_chat_template(messages)
  text = tok.decode(ids)
  assert text.rstrip().endswith('<|im_start|>assistant') and 'You are a helpful' in text, text
  assert stop_ids == frozenset(tok.encode('<|im_end|>')) and len(stop_ids) == 1
