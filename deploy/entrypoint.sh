#!/usr/bin/env bash
# The container's entry point (deploy/Dockerfile).
#
#   serve (the default): serve $MODEL_DIR with serving/server.py on 0.0.0.0:$PORT. With
#     IMPORT_FROM set (a Hugging Face directory, a .gguf file or a built-in name such as
#     smollm2_135m) and no checkpoint in $MODEL_DIR yet, import it there first
#     (launch/import_checkpoint.py, into $MODEL_DIR/imported), so a pod's first start fills its
#     volume and a restart reuses it.
#   anything else: run as a command (python -m trainers.sft ..., bash).
#
# Environment: MODEL_DIR (/model), PORT (8000), IMPORT_FROM (''), API_KEY ('': no auth),
# MAX_CONCURRENT_DECODES / MAX_LEN / MAX_QUEUE (0 / 0 / 64: the server's defaults),
# SERVER_ARGS (more flags for serving.server), DRY_RUN (1: print the commands, run nothing).
set -euo pipefail

run() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

if [[ "${1:-serve}" != "serve" ]]; then
  if [[ "${DRY_RUN:-0}" == "1" ]]; then run "$@"; exit 0; fi
  exec "$@"
fi

model_dir="${MODEL_DIR:-/model}"
if [[ ! -d "${model_dir}/checkpoints" ]]; then
  # Imports go to a subdirectory: the importer renames a staged directory into place, which a
  # mounted volume's root cannot be.
  if [[ ! -d "${model_dir}/imported/checkpoints" && -n "${IMPORT_FROM:-}" ]]; then
    run python -m launch.import_checkpoint --source="${IMPORT_FROM}" \
      --workdir="${model_dir}/imported"
  fi
  if [[ -d "${model_dir}/imported/checkpoints" || -n "${IMPORT_FROM:-}" ]]; then
    model_dir="${model_dir}/imported"
  fi
fi
if [[ "${DRY_RUN:-0}" != "1" && ! -d "${model_dir}/checkpoints" ]]; then
  echo "error: ${model_dir} holds no checkpoints: mount a workdir at MODEL_DIR or set IMPORT_FROM" >&2
  exit 2
fi

args=(--workdir="${model_dir}" --host=0.0.0.0 --port="${PORT:-8000}"
      --max_concurrent_decodes="${MAX_CONCURRENT_DECODES:-0}" --max_len="${MAX_LEN:-0}"
      --max_queue="${MAX_QUEUE:-64}")
if [[ -n "${API_KEY:-}" ]]; then args+=(--api_key="${API_KEY}"); fi
# shellcheck disable=SC2206  # SERVER_ARGS is a list of flags, split on spaces on purpose.
extra=(${SERVER_ARGS:-})
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  run python -m serving.server "${args[@]}" "${extra[@]}"
  exit 0
fi
exec python -m serving.server "${args[@]}" "${extra[@]}"
