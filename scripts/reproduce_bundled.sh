#!/usr/bin/env bash
# Reproduce the bundled CV-VAE and its ablation (docs/reproduction.md) on a CPU, stage by stage.
#
#   scripts/reproduce_bundled.sh [data] [phase1] [ablation] [eval] [shipped] [ship]   (no argument: all)
#
# phase1/ablation/eval: the 4-channel study of docs/reproduction.md. shipped: the model that ships, the
# same recipe with 16 latent channels (the SD3 variant's width), longer (3000 + 800 steps), decoder
# regularisation with the random mapping; ship: copies it into cvvae/assets/bundled.
#
# Runs go to ${RUNS:-runs}/ (checkpoints every 100-250 steps: rerun a stage after an interruption and
# its training runs continue with --resume). Media and the train/held-out split come from
# scripts/get_sample_media.sh --with-opencv into ${CVVAE_MEDIA:-~/.cache/cvvae/media}.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
CVVAE="${CVVAE_BIN:-$REPO/.venv/bin/cvvae}"
RUNS="${RUNS:-runs}"
SPLITS="${CVVAE_MEDIA:-$HOME/.cache/cvvae/media}/splits"
STAGES=("$@")
(( ${#STAGES[@]} )) || STAGES=(data phase1 ablation eval shipped ship)

# Phase-2 ablation: name and overrides; every run has the same budget (configs/bundled-3d.yaml).
ABLATION=(
    "none        loss.dec_reg_weight=0 loss.enc_reg_weight=0"
    "dec         loss.dec_reg_weight=1 loss.enc_reg_weight=0 loss.mapping=random"
    "enc         loss.dec_reg_weight=0 loss.enc_reg_weight=1 loss.mapping=random"
    "both        loss.dec_reg_weight=1 loss.enc_reg_weight=1 loss.mapping=random"
    "dec-first   loss.dec_reg_weight=1 loss.enc_reg_weight=0 loss.mapping=first"
    "dec-average loss.dec_reg_weight=1 loss.enc_reg_weight=0 loss.mapping=average"
    "dec-slice   loss.dec_reg_weight=1 loss.enc_reg_weight=0 loss.mapping=slice"
)
# The shipped model: decoder regularisation with random psi (the paper's choice, fixed before measuring).
SHIPPED=(loss.dec_reg_weight=1 loss.enc_reg_weight=0 loss.mapping=random steps=800)

train() {  # output_dir config overrides...: train, or continue an interrupted run
    local out="$1"; shift
    if [[ -f "$out/final/config.json" ]]; then echo "done already: $out/final"; return; fi
    local resume=(); [[ -d "$out/checkpoints" ]] && resume=(--resume)
    "$CVVAE" train "$@" output_dir="$out" "${resume[@]}"
}

for stage in "${STAGES[@]}"; do
    echo "=== $stage"
    case "$stage" in
        data)
            scripts/get_sample_media.sh --with-opencv ;;
        phase1)
            train "$RUNS/bundled-2d" configs/bundled-2d.yaml
            "$CVVAE" deflate "$RUNS/bundled-2d/final" -o "$RUNS/bundled-2d/vae2d"
            "$CVVAE" inflate --from "$RUNS/bundled-2d/vae2d" -o "$RUNS/inflated" ;;
        ablation)
            for run in "${ABLATION[@]}"; do
                read -r name overrides <<< "$run"
                # shellcheck disable=SC2086
                train "$RUNS/abl-$name" configs/bundled-3d.yaml image_vae="$RUNS/bundled-2d/vae2d" $overrides
            done ;;
        eval)
            args=(--weights "$RUNS/inflated" --name inflated)
            for run in "${ABLATION[@]}"; do
                read -r name _ <<< "$run"
                args+=(--weights "$RUNS/abl-$name/final" --name "$name")
            done
            "$CVVAE" eval "${args[@]}" --image-vae "$RUNS/bundled-2d/vae2d" --videos "$SPLITS/heldout/videos" \
                --frames 13 --stride 1 --size 256 -o "$RUNS/eval-heldout"
            .venv/bin/python scripts/ablation_tables.py "$RUNS/eval-heldout/metrics.json" ;;
        shipped)
            train "$RUNS/c16-2d" configs/bundled-2d.yaml model.z_channels=16 steps=3000
            [[ -d "$RUNS/c16-2d/vae2d" ]] || "$CVVAE" deflate "$RUNS/c16-2d/final" -o "$RUNS/c16-2d/vae2d"
            train "$RUNS/c16-3d" configs/bundled-3d.yaml image_vae="$RUNS/c16-2d/vae2d" "${SHIPPED[@]}"
            "$CVVAE" eval --weights "$RUNS/c16-3d/final" --name shipped --image-vae "$RUNS/c16-2d/vae2d" \
                --videos "$SPLITS/heldout/videos" --frames 13 --stride 1 --size 256 -o "$RUNS/eval-shipped"
            .venv/bin/python scripts/ablation_tables.py "$RUNS/eval-shipped/metrics.json" ;;
        ship)
            rm -rf cvvae/assets/bundled/cvvae cvvae/assets/bundled/vae2d && mkdir -p cvvae/assets/bundled
            "$CVVAE" convert "$RUNS/c16-3d/final" -o cvvae/assets/bundled/cvvae --dtype fp16
            "$CVVAE" deflate "$RUNS/c16-2d/final" -o cvvae/assets/bundled/vae2d --dtype fp16
            # scaling_factor = 1 / std of the image VAE's latents over training frames (SD's recipe for 0.18215)
            .venv/bin/python - "$SPLITS/train/videos" <<'PY'
import glob, itertools, json, sys
import torch
from cvvae.bundled import BUNDLED_DIR, load_bundled
from cvvae.io.video import read_frames, to_tensor
vae, zs = load_bundled("image_vae"), []
for f in sorted(glob.glob(f"{sys.argv[1]}/*.mkv")):
    x = to_tensor(list(itertools.islice(read_frames(f), 0, 200, 25)))[0].transpose(0, 1)[..., :128, :128]
    with torch.no_grad():
        zs.append(vae.encode(x).latent_dist.mean)
scale = round(1 / torch.cat(zs).std().item(), 5)
for sub in ("cvvae", "vae2d"):
    path = BUNDLED_DIR / sub / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "scaling_factor": scale}, indent=2) + "\n")
print(f"scaling_factor {scale}")
PY
            ;;
        *) echo "unknown stage '$stage' (data, phase1, ablation, eval, shipped, ship)" >&2; exit 2 ;;
    esac
done
