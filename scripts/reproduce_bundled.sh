#!/usr/bin/env bash
# Reproduce the bundled CV-VAE and its ablation (docs/reproduction.md) on a CPU, stage by stage.
#
#   scripts/reproduce_bundled.sh [data] [phase1] [ablation] [eval] [shipped] [continued] [extended] [round4]
#                                [decoder] [crops] [fullres] [fullres2] [joint256] [joint256b] [deeper]
#                                [deeper256] [deeper256b] [joint256c] [deeper256c] [diverse] [diverse2] [diverse3]
#                                [wide] [ship]
#                                (no argument: all but wide)
#
# phase1/ablation/eval: the 4-channel study of docs/reproduction.md. shipped: round 1 of the model that
# ships, the same recipe with 16 latent channels (the SD3 variant's width), longer (3000 + 800 steps),
# decoder regularisation with the random mapping. continued: round 2, both phases continued from round 1
# (+3000 image-VAE steps at half the LR, then +2400 CV-VAE steps against the continued image VAE).
# extended: round 3, the round-2 CV-VAE +2000 steps at half the LR. round4: the same as round 2 once more
# (image VAE +3000 steps at a quarter of the LR, CV-VAE +2400). decoder: round 5, the round-4 decoder
# alone +3000 steps with a squared error (the latents, so the compatibility figures, stay as they are).
# crops: round 6, the decoder alone once more on 128-px crops. fullres: round 7, the decoder alone on 256-px
# crops, the evaluation's size; fullres2: round 8, the same continued at half the LR. joint256: round 9, encoder
# and decoder together on 256-px crops; joint256b: round 10, round 9 continued at twice its LR
# with an exponential moving average of the weights (measured, not shipped: docs/reproduction.md). deeper:
# round 11, round 9 grown to two ResBlocks per level and trained on 128-px crops, psi favouring last frames.
# deeper256: round 12, the round-11 decoder alone on 256-px crops. deeper256b: round 13, the round-12
# decoder alone once more, longer at half the LR (measured, not shipped: no gain). joint256c: round 14, the
# round-12 model, encoder and decoder together on 256-px crops (shipped until round 17). deeper256c: round 15, the
# round-14 decoder alone on 256-px crops (measured, not shipped: -0.01 dB). diverse: round 16, round 14 as
# it shipped, encoder and decoder, on the training videos and the camera-motion clips of the training wallpapers
# (scripts/get_sample_media.sh --with-wallpapers), evaluated on the held-out wallpapers' clips and on five whole
# real videos that no training file comes from (--with-unseen); MIXED=bf16 trains in bf16 autocast (for CPUs with
# native bf16). diverse2: round 17, round 16 once more from its end (shipped until round 18); diverse3: round 18,
# the same once more (what ships). wide: round 19, round 18 widened 2x (`cvvae convert --widen 2`) and trained
# with the same recipe in a round of 150 steps (not run by default). ship: copies round 18 (and its image VAE,
# round 4's) into cvvae/assets/bundled.
#
# Runs go to ${RUNS:-runs}/ (checkpoints every 25-250 steps: rerun a stage after an interruption and
# its training runs continue with --resume). Media and the train/held-out split come from
# scripts/get_sample_media.sh --with-opencv --with-wallpapers --with-unseen into ${CVVAE_MEDIA:-~/.cache/cvvae/media}.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
CVVAE="${CVVAE_BIN:-$REPO/.venv/bin/cvvae}"
RUNS="${RUNS:-runs}"
MEDIA="${CVVAE_MEDIA:-$HOME/.cache/cvvae/media}"
SPLITS="$MEDIA/splits"
STAGES=("$@")
(( ${#STAGES[@]} )) || STAGES=(data phase1 ablation eval shipped continued extended round4 decoder crops fullres fullres2
                                joint256 joint256b deeper deeper256 deeper256b joint256c deeper256c diverse diverse2 diverse3
                                ship)

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
SHIPPED=(loss.dec_reg_weight=1 loss.enc_reg_weight=0 loss.mapping=random)
# Round 1 of the shipped model, continued by the stage `continued`: the fp32 runs of the stage `shipped`
# when they exist, else the fp16 copies that shipped at commit 7c2d432 (what docs/reproduction.md's
# round 2 was trained from; the two differ only by fp16 rounding).
ROUND1_COMMIT=7c2d432941841fbfc9ce5656740080b70cc687e9
# Likewise round 6 and its image VAE for the stage `fullres`: the fp16 copies shipped at commit e0ca0b7.
ROUND6_COMMIT=e0ca0b74a3da55e388254bcdb744b0db47becf68
# And round 9 (with round 4's image VAE) for the stages `joint256b` and `deeper`: the fp16 copies shipped at commit b2d56be.
ROUND9_COMMIT=b2d56be77b4fceff4e1adf500df622617c251909
# And round 11 for the stage `deeper256`: the fp16 copies shipped at commit a3add57.
ROUND11_COMMIT=a3add571a4a0ef14d9a521dd6ada5c649a7186b1
# And round 12 for the stages `deeper256b` and `joint256c`: the fp16 copies shipped at commit 995012f.
ROUND12_COMMIT=995012fc8fce4608e99b8f83c39d50654d2a3195
# And round 14 for the stage `deeper256c`: the fp16 copies shipped at commit d895328.
ROUND14_COMMIT=d895328768483dfee65d16907f7d4c3db8a3a6c2

eval_shipped() {  # CV-VAE IMAGE_VAE OUT: held-out evaluation of a round, as in the study, and its table row
    "$CVVAE" eval --weights "$1" --name shipped --image-vae "$2" --videos "$SPLITS/heldout/videos" \
        --frames 13 --stride 1 --size 256 -o "$3"
    .venv/bin/python scripts/ablation_tables.py "$3/metrics.json"
}

from_git() {  # COMMIT NAME STAGE: the bundled pair as committed at COMMIT, into $RUNS/NAME/cvvae/assets/bundled
    git cat-file -e "$1^{commit}" 2>/dev/null || {
        echo "$2 is neither in $RUNS nor in this git history (a shallow clone?); run the stage '$3' first" >&2
        exit 2; }
    mkdir -p "$RUNS/$2"
    git archive "$1" cvvae/assets/bundled | tar -x -C "$RUNS/$2"
}

pair_or_git() {  # CVVAE VAE2D COMMIT NAME STAGE: sets CV and V2D to these fp32 runs where they are here, else to
                 # the fp16 copies committed at COMMIT (extracted into $RUNS/NAME once)
    CV="$1" V2D="$2"
    local copy="$RUNS/$4/cvvae/assets/bundled"
    [[ -f "$CV/config.json" && -f "$V2D/config.json" ]] && return
    [[ -f "$copy/cvvae/config.json" ]] || from_git "$3" "$4" "$5"
    [[ -f "$CV/config.json" ]] || CV="$copy/cvvae"
    [[ -f "$V2D/config.json" ]] || V2D="$copy/vae2d"
}

train() {  # output_dir config overrides...: train, or continue an interrupted run
    local out="$1"; shift
    if [[ -f "$out/final/config.json" ]]; then echo "done already: $out/final"; return; fi
    local resume=(); [[ -d "$out/checkpoints" ]] && resume=(--resume)
    "$CVVAE" train "$@" output_dir="$out" "${resume[@]}"
}

train256() {  # OUT INIT VAE2D OVERRIDES...: a round on 256-px crops (the evaluation's size; squared error, 1 clip or
              # 2 photos a batch) from INIT against the image VAE VAE2D
    local out="$1" init="$2" vae2d="$3"; shift 3
    train "$out" configs/bundled-3d.yaml image_vae="$vae2d" init="$init" "${SHIPPED[@]}" loss.pixel_loss=l2 \
        data.crop=256 data.video_batch=1 data.image_batch=2 "$@"
}

round256() {  # OUT INIT VAE2D REPORT OVERRIDES...: train256, then evaluated into REPORT
    local out="$1" init="$2" vae2d="$3" report="$4"; shift 4
    train256 "$out" "$init" "$vae2d" "$@"
    eval_shipped "$out/final" "$vae2d" "$report"
}

diverse_round() {  # OUT INIT NAME OVERRIDES...: a round on the training videos and the training wallpapers' motion
                  # clips (256-px crops), from INIT with the shipped image VAE, evaluated on the unseen scenes
    local out="$1" init="$2" name="$3"; shift 3
    [[ -d "$MEDIA/motion/train" ]] || { echo "run scripts/get_sample_media.sh --with-wallpapers first" >&2; exit 1; }
    mkdir -p "$RUNS"
    { echo path; find "$SPLITS/train/videos" "$MEDIA/motion/train" -name '*.mkv' | sort; } > "$RUNS/diverse-train.csv"
    # held out means never seen: no held-out photograph may name a training file (video or still)
    .venv/bin/python - "$MEDIA" "$RUNS/diverse-train.csv" <<'PY' || exit 1
import json, sys, pathlib
media, manifest = pathlib.Path(sys.argv[1]), sys.argv[2]
held = {pathlib.Path(r["photo"]).stem for r in json.loads((media / "motion/clips.json").read_text()) if r["split"] == "heldout"}
train = [pathlib.Path(p).name for p in open(manifest).read().split()[1:]] + [p.name for p in (media / "splits/train/images").iterdir()]
leaks = sorted(f for f in train if any(h in f for h in held))
if leaks:
    sys.exit(f"error: held-out scenes in the training data: {leaks[:5]} (rerun scripts/get_sample_media.sh)")
print(f"{len(train)} training files, none from the {len(held)} held-out photographs")
PY
    train256 "$out" "$init" cvvae/assets/bundled/vae2d data.videos="$RUNS/diverse-train.csv" \
        loss.random_frame_weights=[1,1,1,2] steps=300 save_every=25 mixed_precision="${MIXED:-no}" "$@"
    # first on the five whole real videos no training file comes from (get_sample_media.sh --with-unseen)
    [[ ! -s "$MEDIA/unseen/.done" || -f "$RUNS/eval-real-${out##*-}/metrics.json" ]] || "$CVVAE" eval --weights "$out/final" \
        --name "$name" --videos "$MEDIA/unseen" --frames 33 --stride 1 --size 256 --baseline bicubic-8x \
        -o "$RUNS/eval-real-${out##*-}"
    # then on the held-out wallpapers' clips (the shipped model's figures on them are the headline's eval-unseen-256)
    [[ -f "$RUNS/eval-unseen-${out##*-}/metrics.json" ]] || "$CVVAE" eval --weights "$out/final" --name "$name" \
        --videos "$MEDIA/motion/heldout" --frames 33 --stride 1 --size 256 --baseline bicubic-8x \
        -o "$RUNS/eval-unseen-${out##*-}"
    # and as in the study: the held-out clips of the training shots, with the image VAE (compatibility)
    [[ -f "$RUNS/eval-shipped-${out##*-}/metrics.json" ]] ||
        eval_shipped "$out/final" cvvae/assets/bundled/vae2d "$RUNS/eval-shipped-${out##*-}"
}

for stage in "${STAGES[@]}"; do
    echo "=== $stage"
    case "$stage" in
        data)
            scripts/get_sample_media.sh --with-opencv --with-wallpapers --with-unseen ;;
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
            train "$RUNS/c16-3d" configs/bundled-3d.yaml image_vae="$RUNS/c16-2d/vae2d" "${SHIPPED[@]}" steps=800
            eval_shipped "$RUNS/c16-3d/final" "$RUNS/c16-2d/vae2d" "$RUNS/eval-shipped" ;;
        continued)
            r1_vae2d="$RUNS/c16-2d/vae2d" r1_cvvae="$RUNS/c16-3d/final"
            if [[ ! -f "$r1_cvvae/config.json" ]]; then
                from_git "$ROUND1_COMMIT" round1 shipped
                r1_vae2d="$RUNS/round1/cvvae/assets/bundled/vae2d" r1_cvvae="$RUNS/round1/cvvae/assets/bundled/cvvae"
            fi
            [[ -d "$RUNS/c16-2d-init" ]] || "$CVVAE" inflate --from "$r1_vae2d" -o "$RUNS/c16-2d-init"
            train "$RUNS/c16-2d-r2" configs/bundled-2d.yaml init="$RUNS/c16-2d-init" steps=3000 optim.lr=5e-4
            # Its init is an inflated CV-VAE, whose decoder has a temporal attention (zero output projection,
            # so absent on single frames) that the single-frame training moved: it is exported without that
            # branch, and the result is measured against round 1's on held-out frames (docs/reproduction.md).
            [[ -d "$RUNS/c16-2d-r2/vae2d" ]] || "$CVVAE" deflate "$RUNS/c16-2d-r2/final" -o "$RUNS/c16-2d-r2/vae2d" \
                --drop-temporal-attention
            .venv/bin/python scripts/image_vae_psnr.py "$SPLITS/heldout/videos" "$r1_vae2d" "$RUNS/c16-2d-r2/vae2d"
            train "$RUNS/c16-3d-r2" configs/bundled-3d.yaml image_vae="$RUNS/c16-2d-r2/vae2d" init="$r1_cvvae" \
                "${SHIPPED[@]}" steps=2400
            eval_shipped "$RUNS/c16-3d-r2/final" "$RUNS/c16-2d-r2/vae2d" "$RUNS/eval-shipped-r2" ;;
        extended)  # round 3: the round-2 CV-VAE trained 2000 more steps at half the LR, same image VAE
            train "$RUNS/c16-3d-r3" configs/bundled-3d.yaml image_vae="$RUNS/c16-2d-r2/vae2d" \
                init="$RUNS/c16-3d-r2/final" "${SHIPPED[@]}" steps=2000 optim.lr=1e-4
            eval_shipped "$RUNS/c16-3d-r3/final" "$RUNS/c16-2d-r2/vae2d" "$RUNS/eval-shipped-r3" ;;
        round4)  # the image VAE +3000 steps (without temporal attention: its export is exact), the CV-VAE +2400
            # (run folders count each model's own rounds: c16-2d-r3 is the image VAE's third, c16-3d-r4 the CV-VAE's fourth)
            [[ -d "$RUNS/c16-2d-r3-init" ]] || "$CVVAE" inflate --from "$RUNS/c16-2d-r2/vae2d" \
                -o "$RUNS/c16-2d-r3-init" --spatial-attention-only
            train "$RUNS/c16-2d-r3" configs/bundled-2d.yaml init="$RUNS/c16-2d-r3-init" steps=3000 optim.lr=2.5e-4
            [[ -d "$RUNS/c16-2d-r3/vae2d" ]] || "$CVVAE" deflate "$RUNS/c16-2d-r3/final" -o "$RUNS/c16-2d-r3/vae2d"
            .venv/bin/python scripts/image_vae_psnr.py "$SPLITS/heldout/videos" "$RUNS/c16-2d-r2/vae2d" "$RUNS/c16-2d-r3/vae2d"
            train "$RUNS/c16-3d-r4" configs/bundled-3d.yaml image_vae="$RUNS/c16-2d-r3/vae2d" \
                init="$RUNS/c16-3d-r3/final" "${SHIPPED[@]}" steps=2400
            eval_shipped "$RUNS/c16-3d-r4/final" "$RUNS/c16-2d-r3/vae2d" "$RUNS/eval-shipped-r4" ;;
        decoder)  # round 5: the round-4 decoder alone, squared error; latents (so compatibility) unchanged
            train "$RUNS/c16-3d-r5" configs/bundled-3d.yaml image_vae="$RUNS/c16-2d-r3/vae2d" \
                init="$RUNS/c16-3d-r4/final" "${SHIPPED[@]}" freeze_encoder=true loss.pixel_loss=l2 steps=3000
            eval_shipped "$RUNS/c16-3d-r5/final" "$RUNS/c16-2d-r3/vae2d" "$RUNS/eval-shipped-r5" ;;
        crops)  # round 6: the decoder alone again, on 128-px crops (1 clip or 2 photos per batch) at half the LR
            train "$RUNS/c16-3d-r6" configs/bundled-3d.yaml image_vae="$RUNS/c16-2d-r3/vae2d" \
                init="$RUNS/c16-3d-r5/final" "${SHIPPED[@]}" freeze_encoder=true loss.pixel_loss=l2 data.crop=128 \
                data.video_batch=1 data.image_batch=2 steps=1200 optim.lr=1e-4
            eval_shipped "$RUNS/c16-3d-r6/final" "$RUNS/c16-2d-r3/vae2d" "$RUNS/eval-shipped-r6" ;;
        fullres)  # round 7: the decoder alone on 256-px crops (the size it is evaluated at) at half round 5's LR
            r6_vae2d="$RUNS/c16-2d-r3/vae2d" r6_cvvae="$RUNS/c16-3d-r6/final"
            if [[ ! -f "$r6_cvvae/config.json" ]]; then
                from_git "$ROUND6_COMMIT" round6 crops
                r6_vae2d="$RUNS/round6/cvvae/assets/bundled/vae2d" r6_cvvae="$RUNS/round6/cvvae/assets/bundled/cvvae"
            fi
            round256 "$RUNS/c16-3d-r7" "$r6_cvvae" "$r6_vae2d" "$RUNS/eval-shipped-r7" \
                freeze_encoder=true steps=1000 optim.lr=1e-4 ;;
        fullres2)  # round 8: round 7 continued, 600 more steps at half its LR, other clips (seed 1)
            r7_vae2d="$RUNS/c16-2d-r3/vae2d"
            [[ -f "$r7_vae2d/config.json" ]] || r7_vae2d="$RUNS/round6/cvvae/assets/bundled/vae2d"
            round256 "$RUNS/c16-3d-r8" "$RUNS/c16-3d-r7/final" "$r7_vae2d" "$RUNS/eval-shipped-r8" \
                freeze_encoder=true steps=600 optim.lr=5e-5 seed=1 ;;
        joint256)  # round 9: encoder and decoder together on 256-px crops, from round 8 (the latents move)
            r8_vae2d="$RUNS/c16-2d-r3/vae2d"
            [[ -f "$r8_vae2d/config.json" ]] || r8_vae2d="$RUNS/round6/cvvae/assets/bundled/vae2d"
            round256 "$RUNS/c16-3d-r9" "$RUNS/c16-3d-r8/final" "$r8_vae2d" "$RUNS/eval-shipped-r9" \
                steps=300 optim.lr=5e-5 seed=2 ;;
        joint256b)  # round 10: round 9 continued jointly on 256-px crops at twice its LR, EMA of the weights
            pair_or_git "$RUNS/c16-3d-r9/final" "$RUNS/c16-2d-r3/vae2d" "$ROUND9_COMMIT" round9 joint256
            round256 "$RUNS/c16-3d-r10" "$CV" "$V2D" "$RUNS/eval-shipped-r10" \
                steps=400 optim.lr=1e-4 ema_decay=0.995 seed=3 save_every=50 ;;
        deeper)  # round 11: round 9 grown to 2 ResBlocks per level (each new one starts as the identity), then
                 # trained jointly on 128-px crops with random psi drawing each group's last frame 2:1
            pair_or_git "$RUNS/c16-3d-r9/final" "$RUNS/c16-2d-r3/vae2d" "$ROUND9_COMMIT" round9 joint256
            r9_cvvae="$CV" r9_vae2d="$V2D"
            [[ -f "$RUNS/c16-3d-r11-init/config.json" ]] ||
                "$CVVAE" convert "$r9_cvvae" -o "$RUNS/c16-3d-r11-init" --num-res-blocks 2 --dtype fp32
            train "$RUNS/c16-3d-r11" configs/bundled-3d.yaml image_vae="$r9_vae2d" init="$RUNS/c16-3d-r11-init" \
                "${SHIPPED[@]}" loss.random_frame_weights=[1,1,1,2] loss.pixel_loss=l2 data.crop=128 \
                data.video_batch=1 data.image_batch=2 steps=800 optim.lr=1e-4 seed=4 save_every=100
            eval_shipped "$RUNS/c16-3d-r11/final" "$r9_vae2d" "$RUNS/eval-shipped-r11" ;;
        deeper256)  # round 12: the round-11 decoder alone on 256-px crops (latents, so compatibility, unchanged)
            pair_or_git "$RUNS/c16-3d-r11/final" "$RUNS/c16-2d-r3/vae2d" "$ROUND11_COMMIT" round11 deeper
            round256 "$RUNS/c16-3d-r12" "$CV" "$V2D" "$RUNS/eval-shipped-r12" \
                freeze_encoder=true steps=200 optim.lr=1e-4 seed=5 save_every=50 ;;
        deeper256b)  # round 13 (not shipped): the round-12 decoder alone, 400 more steps at half the LR
            pair_or_git "$RUNS/c16-3d-r12/final" "$RUNS/c16-2d-r3/vae2d" "$ROUND12_COMMIT" round12 deeper256
            round256 "$RUNS/c16-3d-r13" "$CV" "$V2D" "$RUNS/eval-shipped-r13" \
                freeze_encoder=true steps=400 optim.lr=5e-5 seed=6 save_every=50 ;;
        joint256c)  # round 14 (shipped until round 17): the round-12 model, encoder and decoder, on 256-px crops (the latents move);
                    # psi_random keeps round 11's frame weights so psi_slice keeps its room
            pair_or_git "$RUNS/c16-3d-r12/final" "$RUNS/c16-2d-r3/vae2d" "$ROUND12_COMMIT" round12 deeper256
            round256 "$RUNS/c16-3d-r14" "$CV" "$V2D" "$RUNS/eval-shipped-r14" \
                loss.random_frame_weights=[1,1,1,2] steps=300 optim.lr=1e-4 seed=7 save_every=25 ;;
        deeper256c)  # round 15 (not shipped): the round-14 decoder alone on 256-px crops, as round 12 followed round 11
            pair_or_git "$RUNS/c16-3d-r14/final" "$RUNS/c16-2d-r3/vae2d" "$ROUND14_COMMIT" round14 joint256c
            round256 "$RUNS/c16-3d-r15" "$CV" "$V2D" "$RUNS/eval-shipped-r15" \
                freeze_encoder=true steps=200 optim.lr=1e-4 seed=8 save_every=25 ;;
        diverse)  # round 16: round 14 as it shipped (its fp16 copy) on every training video and training wallpaper clip
            [[ -f "$RUNS/round14/cvvae/assets/bundled/cvvae/config.json" ]] || from_git "$ROUND14_COMMIT" round14 joint256c
            diverse_round "$RUNS/c16-3d-r16" "$RUNS/round14/cvvae/assets/bundled/cvvae" round16 seed=16 optim.lr=1e-4 ;;
        diverse2)  # round 17: round 16 once more, from its end (the same data and recipe: is the curve still rising?)
            diverse_round "$RUNS/c16-3d-r17" "$RUNS/c16-3d-r16/final" round17 seed=17 optim.lr=1e-4 ;;
        diverse3)  # round 18: round 17 once more (what ships; the curve: +1.68, +0.46, +0.03 dB on the wallpaper clips)
            diverse_round "$RUNS/c16-3d-r18" "$RUNS/c16-3d-r17/final" round18 seed=18 optim.lr=1e-4 ;;
        wide)  # round 19: round 18 with twice the channels at every level (the same function at the start), trained
               # with the same recipe in a round of 150 steps (4x the work per step); docs/reproduction.md says why
            r18="$RUNS/c16-3d-r18/final"; [[ -f "$r18/config.json" ]] || r18=cvvae/assets/bundled/cvvae  # its fp16 copy
            [[ -f "$RUNS/c16-3d-r19-init/config.json" ]] || "$CVVAE" convert "$r18" -o "$RUNS/c16-3d-r19-init" --widen 2
            diverse_round "$RUNS/c16-3d-r19" "$RUNS/c16-3d-r19-init" round19 seed=19 optim.lr=1e-4 steps=150 ;;
        ship)
            rm -rf cvvae/assets/bundled/cvvae && mkdir -p cvvae/assets/bundled
            "$CVVAE" convert "$RUNS/c16-3d-r18/final" -o cvvae/assets/bundled/cvvae --dtype fp16
            # the image VAE is round 4's: exported anew when its fp32 run is here, else the committed fp16 copy stays
            if [[ -f "$RUNS/c16-2d-r3/final/config.json" ]]; then
                rm -rf cvvae/assets/bundled/vae2d
                "$CVVAE" deflate "$RUNS/c16-2d-r3/final" -o cvvae/assets/bundled/vae2d --dtype fp16
            fi
            .venv/bin/python scripts/scaling_factor.py "$SPLITS/train/videos" cvvae/assets/bundled/vae2d \
                cvvae/assets/bundled/cvvae ;;
        *) echo "unknown stage '$stage' (data, phase1, ablation, eval, shipped, continued, extended, round4, decoder," \
                "crops, fullres, fullres2, joint256, joint256b, deeper, deeper256, deeper256b, joint256c, deeper256c, diverse," \
                "diverse2, diverse3, wide, ship)" >&2; exit 2 ;;
    esac
done
