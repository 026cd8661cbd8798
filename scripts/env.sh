# Environment shared by the main job and the tests: offline models, DeepSpeed on CPU when no GPU,
# compiled extension caches kept inside the repository.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
